"""The list precedence of docs/ARCHITECTURE.md "Precedence" (steps A-D), and who is outgoing."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from postwarden.policy.list_entries import CompiledLists, parse_entry
from postwarden.policy.precedence import decide_lists, is_outgoing
from postwarden.policy.records import ListEntry, ListName
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Action, Rule

P, F = ListName.PERMITTED, ListName.FORBIDDEN
PASS = "pass"  # DUNNO with a *_PERMITTED rule: no spam checks, Postfix's own checks still run
CHECK = "check"  # no list decided: the spam checks run
REJECT = "reject"


@dataclass(frozen=True)
class Case:
    name: str
    entries: tuple[tuple[ListName, str], ...]
    client: str
    sender: str
    outcome: str
    rule: Rule


def _lists(entries: tuple[tuple[ListName, str], ...]) -> CompiledLists:
    return CompiledLists.from_entries(ListEntry(name, parse_entry(text)) for name, text in entries)


# The seed's sample lists (Rules section): permitted 10.128.0.3, 192.168.130.3, example.com;
# forbidden 192.168.130.3, j.smith@test.com.
SEED = (
    (P, "10.128.0.3"),
    (P, "192.168.130.3"),
    (P, "example.com"),
    (F, "192.168.130.3"),
    (F, "j.smith@test.com"),
)

# One row per case, so the cases read as the table they are.
# fmt: off
CASES = [
    # --- the table, row by row ---
    Case("nothing listed -> spam checks",
        (), "192.0.2.1", "a@b.org", CHECK, Rule.NO_CHECKS),
    Case("A: ip forbidden -> rejected",
        ((F, "192.0.2.1"),), "192.0.2.1", "a@b.org", REJECT, Rule.IP_FORBIDDEN),
    Case("A: ip in forbidden network -> rejected",
        ((F, "192.0.2.*"),), "192.0.2.9", "a@b.org", REJECT, Rule.IP_FORBIDDEN),
    Case("A: ip permitted beats ip forbidden",
        ((P, "192.0.2.1"), (F, "192.0.2.0/24")), "192.0.2.1", "a@b.org", PASS, Rule.IP_PERMITTED),
    Case("B: mailbox permitted -> pass",
        ((P, "a@b.org"),), "192.0.2.1", "A@B.org", PASS, Rule.MAILBOX_PERMITTED),
    Case("B: mailbox forbidden -> rejected",
        ((F, "a@b.org"),), "192.0.2.1", "a@b.org", REJECT, Rule.MAILBOX_FORBIDDEN),
    Case("B: mailbox permitted beats mailbox forbidden",
        ((P, "a@b.org"), (F, "a@b.org")), "192.0.2.1", "a@b.org", PASS, Rule.MAILBOX_PERMITTED),
    Case("C: domain permitted -> pass",
        ((P, "b.org"),), "192.0.2.1", "a@b.org", PASS, Rule.DOMAIN_PERMITTED),
    Case("C: domain forbidden -> rejected",
        ((F, "b.org"),), "192.0.2.1", "a@b.org", REJECT, Rule.DOMAIN_FORBIDDEN),
    Case("C: subdomain entry covers subdomains",
        ((F, ".b.org"),), "192.0.2.1", "a@x.b.org", REJECT, Rule.DOMAIN_FORBIDDEN),
    Case("C: subdomain entry leaves the domain itself",
        ((F, ".b.org"),), "192.0.2.1", "a@b.org", CHECK, Rule.NO_CHECKS),
    Case("C: domain permitted beats domain forbidden",
        ((P, "b.org"), (F, "b.org")), "192.0.2.1", "a@b.org", PASS, Rule.DOMAIN_PERMITTED),
    Case("D: ip permitted, sender unlisted -> pass",
        ((P, "192.0.2.0/24"),), "192.0.2.1", "a@b.org", PASS, Rule.IP_PERMITTED),
    # --- the seed's examples ---
    Case("ip forbidden + domain permitted -> rejected",
        ((F, "192.0.2.1"), (P, "b.org")), "192.0.2.1", "a@b.org", REJECT, Rule.IP_FORBIDDEN),
    Case("ip forbidden + mailbox permitted -> rejected",
        ((F, "192.0.2.1"), (P, "a@b.org")), "192.0.2.1", "a@b.org", REJECT, Rule.IP_FORBIDDEN),
    Case("ip permitted + domain forbidden -> rejected",
        ((P, "192.0.2.1"), (F, "b.org")), "192.0.2.1", "a@b.org", REJECT, Rule.DOMAIN_FORBIDDEN),
    Case("ip permitted + mailbox forbidden -> rejected",
        ((P, "192.0.2.1"), (F, "a@b.org")), "192.0.2.1", "a@b.org", REJECT, Rule.MAILBOX_FORBIDDEN),
    Case("domain permitted + mailbox forbidden -> rejected",
        ((P, "b.org"), (F, "a@b.org")), "192.0.2.1", "a@b.org", REJECT, Rule.MAILBOX_FORBIDDEN),
    Case("mailbox permitted + domain forbidden -> pass",
        ((P, "a@b.org"), (F, "b.org")), "192.0.2.1", "a@b.org", PASS, Rule.MAILBOX_PERMITTED),
    # --- the seed's sample lists ---
    Case("seed: 10.128.0.3 permitted -> pass",
        SEED, "10.128.0.3", "x@y.net", PASS, Rule.IP_PERMITTED),
    Case("seed: 192.168.130.3 in both lists: permitted wins",
        SEED, "192.168.130.3", "x@y.net", PASS, Rule.IP_PERMITTED),
    Case("seed: example.com permitted -> pass",
        SEED, "198.51.100.7", "news@example.com", PASS, Rule.DOMAIN_PERMITTED),
    Case("seed: example.com exact, not its subdomains",
        SEED, "198.51.100.7", "news@mail.example.com", CHECK, Rule.NO_CHECKS),
    Case("seed: j.smith@test.com forbidden -> rejected",
        SEED, "198.51.100.7", "J.Smith@Test.com", REJECT, Rule.MAILBOX_FORBIDDEN),
    Case("seed: j.smith@test.com forbidden even from a permitted ip",
        SEED, "10.128.0.3", "j.smith@test.com", REJECT, Rule.MAILBOX_FORBIDDEN),
    Case("seed: other test.com mailbox is unlisted",
        SEED, "198.51.100.7", "r.johnson@test.com", CHECK, Rule.NO_CHECKS),
    # --- the empty sender and address forms ---
    Case("empty sender has no mailbox or domain",
        ((F, "b.org"),), "192.0.2.1", "", CHECK, Rule.NO_CHECKS),
    Case("empty sender from a permitted ip -> pass",
        ((P, "192.0.2.1"),), "192.0.2.1", "", PASS, Rule.IP_PERMITTED),
    Case("empty sender from a forbidden ip -> rejected",
        ((F, "192.0.2.1"),), "192.0.2.1", "", REJECT, Rule.IP_FORBIDDEN),
    Case("ipv4-mapped client matches the ipv4 entry",
        ((F, "192.0.2.0/24"),), "::ffff:192.0.2.1", "a@b.org", REJECT, Rule.IP_FORBIDDEN),
    Case("ipv6 client in a forbidden prefix",
        ((F, "2001:db8::/32"),), "2001:db8::25", "a@b.org", REJECT, Rule.IP_FORBIDDEN),
]
# fmt: on
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_list_precedence_table(case: Case) -> None:
    request = PolicyRequest({"client_address": case.client, "sender": case.sender})
    verdict = decide_lists(request, _lists(case.entries))
    assert verdict.rule is case.rule
    if case.outcome == REJECT:
        assert (verdict.action, verdict.smtp_code, verdict.enhanced_code) == (
            Action.REJECT,
            554,
            "5.7.1",
        )
        assert verdict.final
    elif case.outcome == PASS:
        # Never OK: a pass must not bypass Postfix's anti-relay.
        assert verdict.action is Action.DUNNO
        assert verdict.final
    else:
        assert verdict.action is Action.DUNNO
        assert not verdict.final


def test_reject_text_names_what_matched() -> None:
    lists = _lists(((F, "192.0.2.1"), (F, "bad@b.org"), (F, ".evil.test")))
    ip = decide_lists(PolicyRequest({"client_address": "192.0.2.1"}), lists)
    assert "192.0.2.1" in ip.text
    mailbox = decide_lists(
        PolicyRequest({"client_address": "198.51.100.1", "sender": "Bad@B.org"}), lists
    )
    assert "bad@b.org" in mailbox.text
    domain = decide_lists(
        PolicyRequest({"client_address": "198.51.100.1", "sender": "x@mx.evil.test"}), lists
    )
    assert "mx.evil.test" in domain.text


def test_reject_text_is_sanitised() -> None:
    lists = _lists(((F, ".evil.test"),))
    hostile = "x@a\r\n250 ok\x00" + "b" * 500 + ".evil.test"
    verdict = decide_lists(
        PolicyRequest({"client_address": "198.51.100.1", "sender": hostile}), lists
    )
    assert verdict.rule is Rule.DOMAIN_FORBIDDEN
    assert all(" " <= ch <= "~" for ch in verdict.text)
    assert len(verdict.text) < 300


TRUSTED = [
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("192.168.0.0/16"),
]


@pytest.mark.parametrize(
    ("attributes", "outgoing"),
    [
        ({"client_address": "203.0.113.5", "sasl_username": "alice"}, True),
        ({"client_address": "127.0.0.1"}, True),
        ({"client_address": "::1"}, True),
        ({"client_address": "192.168.7.7"}, True),
        ({"client_address": "::ffff:192.168.7.7"}, True),
        ({"client_address": "203.0.113.5"}, False),
        ({"client_address": "2001:db8::1"}, False),
        ({"client_address": "unknown"}, False),
        ({}, False),
    ],
)
def test_outgoing_is_sasl_or_trusted_network(attributes: dict[str, str], outgoing: bool) -> None:
    assert is_outgoing(PolicyRequest(attributes), TRUSTED) is outgoing
