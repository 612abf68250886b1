"""Forwarding rules as the seed's examples describe them."""

from __future__ import annotations

import pytest

from postwarden.appliance.aliases import (
    MAX_TARGETS,
    AliasError,
    AliasRule,
    describe,
    find_loop,
    make_rule,
    normalize_address,
)

MAIN = "example.com"
LOCAL = ["example.com", "example.org"]


def rule(address: str, *targets: str) -> AliasRule:
    return make_rule(address, targets, main_domain=MAIN, local_domains=LOCAL)


def test_seed_alias_manager_to_r_johnson() -> None:
    r = rule("manager", "r.johnson")
    assert r == AliasRule("manager@example.com", ("r.johnson@example.com",))
    assert r.kind(LOCAL) == "alias"


def test_seed_group_sales() -> None:
    r = rule("sales", "j.smith", "r.johnson")
    assert r.targets == ("j.smith@example.com", "r.johnson@example.com")
    assert r.kind(LOCAL) == "group"


def test_seed_vacation_copy_keeps_the_mailbox_in_the_targets() -> None:
    r = rule("r.johnson", "j.smith", "r.johnson")
    assert r.address in r.targets
    assert r.kind(LOCAL) == "copy"


def test_seed_external_address() -> None:
    r = rule("ceo", "ceo@gmail.com")
    assert r.targets == ("ceo@gmail.com",)
    assert r.kind(LOCAL) == "external"
    assert describe(r, LOCAL) == "ceo@example.com -> ceo@gmail.com  (external)"


def test_addresses_are_lower_cased_and_repeats_dropped() -> None:
    r = rule("Sales@Example.COM", "J.Smith", "j.smith@example.com", "r.johnson")
    assert r.address == "sales@example.com"
    assert r.targets == ("j.smith@example.com", "r.johnson@example.com")


def test_additional_domain_addresses_may_forward() -> None:
    assert rule("info@example.org", "j.smith").address == "info@example.org"


def test_outside_address_cannot_forward() -> None:
    # It would redirect our own users' outgoing mail to that address.
    with pytest.raises(AliasError, match="only addresses in our own domains"):
        rule("someone@gmail.com", "j.smith")


@pytest.mark.parametrize("bad", ["", "@example.com", "a b", "a@", "a@-x.com", "a..b", "x@y@z!"])
def test_malformed_addresses_are_refused(bad: str) -> None:
    with pytest.raises(AliasError):
        normalize_address(bad, MAIN)


def test_no_targets_refused() -> None:
    with pytest.raises(AliasError, match="at least one target"):
        rule("sales")


def test_only_itself_refused() -> None:
    with pytest.raises(AliasError, match="only to itself"):
        rule("sales", "sales@example.com")


def test_too_many_targets_refused() -> None:
    with pytest.raises(AliasError, match="at most"):
        rule("all", *(f"u{i}" for i in range(MAX_TARGETS + 1)))


def test_loop_between_two_aliases_found() -> None:
    existing = {"a@example.com": ["b@example.com"]}
    assert find_loop(existing, rule("b", "a")) == [
        "b@example.com",
        "a@example.com",
        "b@example.com",
    ]


def test_longer_loop_found() -> None:
    existing = {
        "a@example.com": ["b@example.com"],
        "b@example.com": ["x@gmail.com", "c@example.com"],
    }
    loop = find_loop(existing, rule("c", "a"))
    assert loop is not None and loop[0] == loop[-1] == "c@example.com"


def test_vacation_copy_and_chains_are_not_loops() -> None:
    existing = {"manager@example.com": ["r.johnson@example.com"]}
    assert find_loop(existing, rule("r.johnson", "j.smith", "r.johnson")) is None
    assert find_loop(existing, rule("boss", "manager")) is None


def test_loop_found_at_the_end_of_a_long_chain() -> None:
    # Deeper than Python's recursion limit: the search must not recurse per alias.
    existing = {f"a{i}@example.com": [f"a{i + 1}@example.com"] for i in range(3000)}
    existing["a3000@example.com"] = ["boss@example.com"]
    loop = find_loop(existing, rule("boss", "a0"))
    assert loop is not None
    assert loop[0] == loop[-1] == "boss@example.com" and len(loop) == 3003
    assert find_loop(existing, rule("other", "a0")) is None
