"""Which sender and From: addresses a login may use (postwarden.policy.sender_identity)."""

from __future__ import annotations

from postwarden.config import parse_config
from postwarden.policy.sender_identity import (
    is_granted,
    may_use_from_address,
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


def test_from_addresses_of_a_login() -> None:
    assert may_use_from_address("alice@example.com", "Alice@Example.com", GRANTS)
    assert may_use_from_address("alice@example.com", "anyone@example.org", GRANTS)
    # Its own domain is not enough: bob is a neighbour, not alice.
    assert not may_use_from_address("alice@example.com", "bob@example.com", GRANTS)
    assert not may_use_from_address("bob@example.com", "anyone@example.org", GRANTS)
    # The envelope sender Postfix bound to the login (an alias of hers) is hers in From too.
    assert may_use_from_address("alice@example.com", "Sales@Shop.example", {}, "sales@shop.example")
    assert not may_use_from_address(
        "alice@example.com", "ceo@shop.example", {}, "sales@shop.example"
    )
