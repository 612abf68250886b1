"""Which addresses and From: domains a login may use (postwarden.sender_identity)."""

from __future__ import annotations

from postwarden.config import parse_config
from postwarden.sender_identity import (
    from_domains,
    is_granted,
    may_use_from_domain,
    owners_by_grant,
)

GRANTS = parse_config(
    {"mail": {"sender_grants": {"Alice@Example.com": ["CEO@Example.com", "@Example.ORG"]}}}
).mail.sender_grants


def test_grants_are_normalised_by_the_config() -> None:
    assert GRANTS == {"alice@example.com": ["ceo@example.com", "@example.org"]}


def test_a_login_owns_itself_whatever_the_case() -> None:
    assert is_granted("alice@example.com", "Alice@EXAMPLE.com", {})


def test_a_login_does_not_own_a_neighbour() -> None:
    assert not is_granted("alice@example.com", "bob@example.com", GRANTS)


def test_a_granted_address_and_a_granted_domain() -> None:
    assert is_granted("alice@example.com", "ceo@example.com", GRANTS)
    assert is_granted("alice@example.com", "anyone@example.org", GRANTS)
    assert not is_granted("alice@example.com", "anyone@sub.example.org", GRANTS)


def test_owners_by_grant() -> None:
    assert owners_by_grant("x@EXAMPLE.org", GRANTS) == ["alice@example.com"]
    assert owners_by_grant("bob@example.com", GRANTS) == []


def test_from_domains_of_a_login() -> None:
    assert from_domains("alice@example.com", GRANTS, ["sales@shop.example"]) == {
        "example.com",
        "example.org",
        "shop.example",
    }
    assert may_use_from_domain("alice@example.com", "Example.ORG.", GRANTS)
    assert not may_use_from_domain("bob@example.com", "example.org", GRANTS)
