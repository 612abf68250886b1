"""The whole filtering order (docs/ARCHITECTURE.md, "Filtering order"), one row per case.

Each row gives the request, the lists, the steps that are on and the answer each lookup
would get; the driver below derives the request's facts and asks `next_step` as
`Pipeline` does, records which lookups it
asked for and in which order, and checks the decision: verdict, records to write, the
header to remember for the message, the failure to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from postwarden.config import Config
from postwarden.policy.dnsbl import DnsblResult
from postwarden.policy.filtering_order import (
    Decision,
    DnsblLookup,
    FilteringSettings,
    Gathered,
    GreylistLookup,
    GreylistRecords,
    GreylistWrite,
    SpfLookup,
    Unavailable,
    failed,
    header_name,
    next_step,
    request_facts,
)
from postwarden.policy.greylisting import parse_large_senders
from postwarden.policy.list_entries import CompiledLists, parse_entry
from postwarden.policy.records import ClientNetworkRecord, ListEntry, ListName, TripletRecord
from postwarden.policy.request import PolicyRequest
from postwarden.policy.spf_check import SpfResult
from postwarden.policy.verdict import Action, Rule

P, F = ListName.PERMITTED, ListName.FORBIDDEN
NOW = 1_700_000_000.0
NETWORK = "192.0.2.0/24"
KEY = "192.0.2.0/24 alice@example.org bob@example.com"
EXPIRY = 35 * 86400.0

NOT_LISTED = DnsblResult()
LISTED = DnsblResult(score=1, listed=(("dnsbl.test", "127.0.0.2"),))
SPF_HEADER = "Received-SPF: pass (domain of example.org designates 192.0.2.10) x=y"
SPF_PASS = SpfResult("pass", "sender SPF authorized", SPF_HEADER)
SPF_FAIL = SpfResult("fail", "not authorized", "Received-SPF: fail (not designated) x=y")
SPF_TEMPERROR = SpfResult("temperror", "no result", "Received-SPF: temperror (lookup) x=y")
STORE_DOWN = Unavailable("store", "connection refused")
DNS_DOWN = Unavailable("dns", "NoNameservers")
NEW = GreylistRecords()  # neither the triplet nor its network is known
WAITED = GreylistRecords(TripletRecord(NOW - 301, NOW - 301, 0))  # retry after the delay
EARLY = GreylistRecords(TripletRecord(NOW - 60, NOW - 60, 0))
TOO_LATE = GreylistRecords(TripletRecord(NOW - 3 * 86400, NOW - 3 * 86400, 0))
KNOWN = GreylistRecords(TripletRecord(NOW - 9000, NOW - 100, 3))
WHITELISTED = GreylistRecords(None, ClientNetworkRecord(5, NOW - 10))

DEFERRED_NEW = (TripletRecord(NOW, NOW, 0), None)
PASSED = (TripletRecord(NOW - 301, NOW, 1), ClientNetworkRecord(1, NOW))
X_GREYLIST = "X-Greylist: delayed 301 seconds by postwarden;"

ALL_ON: dict[str, Any] = {
    "dnsbl": {"enabled": True, "zones": [{"zone": "dnsbl.test"}]},
    "spf": {"enabled": True},
    "greylisting": {"enabled": True},
}
SPF_ONLY: dict[str, Any] = {"spf": {"enabled": True}, "greylisting": {"enabled": False}}
GREYLIST_ONLY: dict[str, Any] = {"greylisting": {"enabled": True}}
NOTHING_ON: dict[str, Any] = {"greylisting": {"enabled": False}}


@dataclass(frozen=True)
class Row:
    name: str
    config: dict[str, Any]
    # expected: action, rule, and the start of the text (header line, reply text)
    action: Action
    rule: Rule
    text: str = ""
    asks: tuple[str, ...] = ()  # lookups asked for, in order; "write" = the greylist write
    writes: tuple[TripletRecord | None, ClientNetworkRecord | None] | None = None
    remember: str | None = None
    failure: str | None = None  # the failure kind handed back to log and count
    # the facts
    request: dict[str, str] = field(default_factory=dict)
    entries: tuple[tuple[ListName, str], ...] = ()
    dnsbl: DnsblResult | Unavailable | None = None
    spf: SpfResult | Unavailable | None = None
    greylist: GreylistRecords | Unavailable | None = None
    write_fails: bool = False
    sent: frozenset[str] = frozenset()
    large_senders: str = ""
    now: float = NOW


# fmt: off
ROWS = [
    # --- not a stage we judge; outgoing mail ---
    *[Row(f"{state} stage: not judged", ALL_ON, Action.DUNNO, Rule.NOT_APPLICABLE,
          request={"protocol_state": state}, entries=((F, "192.0.2.10"),))
      for state in ("CONNECT", "HELO", "MAIL", "DATA", "END-OF-MESSAGE")],
    Row("authenticated client: outgoing, no check", ALL_ON, Action.DUNNO, Rule.TRUSTED,
        request={"sasl_username": "alice"}, entries=((F, "example.org"),)),
    Row("trusted network: outgoing, no check", ALL_ON, Action.DUNNO, Rule.TRUSTED,
        request={"client_address": "127.0.0.1"}, entries=((F, "127.0.0.1"),)),
    Row("trusted IPv6 loopback: outgoing", ALL_ON, Action.DUNNO, Rule.TRUSTED,
        request={"client_address": "::1"}),
    # --- the lists decide: nothing is looked up ---
    Row("forbidden IP rejects before any lookup", ALL_ON, Action.REJECT, Rule.IP_FORBIDDEN,
        "Client address 192.0.2.10 is forbidden", entries=((F, "192.0.2.0/24"),)),
    Row("permitted mailbox passes without lookups", ALL_ON, Action.DUNNO,
        Rule.MAILBOX_PERMITTED, entries=((P, "Alice@Example.org"), (F, "example.org"))),
    Row("forbidden mailbox rejects", ALL_ON, Action.REJECT, Rule.MAILBOX_FORBIDDEN,
        "Sender <alice@example.org> is forbidden", entries=((F, "alice@example.org"),)),
    Row("permitted domain passes without lookups", ALL_ON, Action.DUNNO,
        Rule.DOMAIN_PERMITTED, entries=((P, "example.org"),)),
    Row("forbidden domain beats a permitted IP", ALL_ON, Action.REJECT, Rule.DOMAIN_FORBIDDEN,
        entries=((P, "192.0.2.10"), (F, "example.org"))),
    Row("permitted IP passes without lookups", ALL_ON, Action.DUNNO, Rule.IP_PERMITTED,
        entries=((P, "192.0.2.0/24"),)),
    # --- the spam checks, in order: DNSBL, SPF, greylisting ---
    Row("no list decides: DNSBL, SPF, greylisting; a new triplet is deferred", ALL_ON,
        Action.DEFER_IF_PERMIT, Rule.GREYLIST_DEFER, "Greylisted, please try again later",
        asks=("dnsbl", "spf", "greylist", "write"), writes=DEFERRED_NEW,
        dnsbl=NOT_LISTED, spf=SPF_PASS, greylist=NEW),
    Row("DNSBL listing rejects before SPF and greylisting", ALL_ON, Action.REJECT, Rule.DNSBL,
        "Client host blocked using DNSBL: dnsbl.test", asks=("dnsbl",), dnsbl=LISTED),
    Row("DNSBL score below the threshold goes on", {**ALL_ON, "dnsbl": {
            "enabled": True, "zones": [{"zone": "dnsbl.test"}], "threshold": 2}},
        Action.DEFER_IF_PERMIT, Rule.GREYLIST_DEFER, asks=("dnsbl", "spf", "greylist", "write"),
        writes=DEFERRED_NEW, dnsbl=LISTED, spf=SPF_PASS, greylist=NEW),
    Row("DNS failure at the DNSBL: the default, nothing more asked", ALL_ON, Action.DUNNO,
        Rule.DEFAULT, asks=("dnsbl",), failure="dns", dnsbl=DNS_DOWN),
    Row("SPF fail rejects before greylisting (550 5.7.23)", ALL_ON, Action.REJECT,
        Rule.SPF_FAIL, "SPF check failed: not authorized", asks=("dnsbl", "spf"),
        dnsbl=NOT_LISTED, spf=SPF_FAIL),
    Row("SPF fail only marked: greylisting still defers", {**ALL_ON, "spf": {
            "enabled": True, "fail_action": "mark"}},
        Action.DEFER_IF_PERMIT, Rule.GREYLIST_DEFER, asks=("dnsbl", "spf", "greylist", "write"),
        writes=DEFERRED_NEW, dnsbl=NOT_LISTED, spf=SPF_FAIL, greylist=NEW),
    Row("DNS failure in SPF: the default", ALL_ON, Action.DUNNO, Rule.DEFAULT,
        asks=("dnsbl", "spf"), failure="dns", dnsbl=NOT_LISTED, spf=DNS_DOWN),
    Row("SPF temperror is a result, not a failure: its header is kept", SPF_ONLY,
        Action.PREPEND, Rule.SPF, "Received-SPF: temperror", asks=("spf",),
        remember="received-spf", spf=SPF_TEMPERROR),
    # --- greylisting and the one header per reply ---
    Row("early retry: still deferred, delay counted from the first attempt", GREYLIST_ONLY,
        Action.DEFER_IF_PERMIT, Rule.GREYLIST_DEFER, asks=("greylist", "write"),
        writes=(TripletRecord(NOW - 60, NOW, 0), None), greylist=EARLY),
    Row("retry after the retry window: deferred again from now", GREYLIST_ONLY,
        Action.DEFER_IF_PERMIT, Rule.GREYLIST_DEFER, asks=("greylist", "write"),
        writes=DEFERRED_NEW, greylist=TOO_LATE),
    Row("retry after the delay passes with X-Greylist", GREYLIST_ONLY, Action.PREPEND,
        Rule.GREYLIST_PASS, X_GREYLIST, asks=("greylist", "write"), writes=PASSED,
        remember="x-greylist", greylist=WAITED),
    Row("pass without header when add_header is off", {"greylisting": {
            "enabled": True, "add_header": False}},
        Action.DUNNO, Rule.GREYLIST_PASS, asks=("greylist", "write"), writes=PASSED,
        greylist=WAITED),
    Row("a known triplet passes, its records refreshed", GREYLIST_ONLY, Action.DUNNO,
        Rule.GREYLIST_KNOWN, asks=("greylist", "write"),
        writes=(TripletRecord(NOW - 9000, NOW, 4), ClientNetworkRecord(1, NOW)), greylist=KNOWN),
    Row("an auto-whitelisted network passes, nothing written", GREYLIST_ONLY, Action.DUNNO,
        Rule.GREYLIST_KNOWN, asks=("greylist",), greylist=WHITELISTED),
    Row("a large sender is exempt (its records are still read), nothing written",
        GREYLIST_ONLY, Action.DUNNO, Rule.GREYLIST_EXEMPT, asks=("greylist",),
        greylist=NEW, large_senders=".example.org"),
    Row("Received-SPF wins over X-Greylist for the first recipient", ALL_ON, Action.PREPEND,
        Rule.GREYLIST_PASS, SPF_HEADER, asks=("dnsbl", "spf", "greylist", "write"),
        writes=PASSED, remember="received-spf", dnsbl=NOT_LISTED, spf=SPF_PASS, greylist=WAITED),
    Row("the next recipient of the message gets X-Greylist", ALL_ON, Action.PREPEND,
        Rule.GREYLIST_PASS, X_GREYLIST, asks=("dnsbl", "spf", "greylist", "write"),
        writes=PASSED, remember="x-greylist", dnsbl=NOT_LISTED, spf=SPF_PASS, greylist=WAITED,
        sent=frozenset({"received-spf"})),
    Row("both headers sent: later recipients add none", ALL_ON, Action.DUNNO,
        Rule.GREYLIST_PASS, asks=("dnsbl", "spf", "greylist", "write"), writes=PASSED,
        dnsbl=NOT_LISTED, spf=SPF_PASS, greylist=WAITED,
        sent=frozenset({"received-spf", "x-greylist"})),
    Row("a deferral wins over the Received-SPF header", ALL_ON, Action.DEFER_IF_PERMIT,
        Rule.GREYLIST_DEFER, asks=("dnsbl", "spf", "greylist", "write"), writes=DEFERRED_NEW,
        dnsbl=NOT_LISTED, spf=SPF_PASS, greylist=NEW, sent=frozenset({"received-spf"})),
    Row("SPF alone: Received-SPF once per message", SPF_ONLY, Action.PREPEND, Rule.SPF,
        SPF_HEADER, asks=("spf",), remember="received-spf", spf=SPF_PASS),
    Row("SPF alone, header already sent: nothing added", SPF_ONLY, Action.DUNNO, Rule.SPF,
        asks=("spf",), spf=SPF_PASS, sent=frozenset({"received-spf"})),
    Row("no instance: the header is prepended, nothing remembered", SPF_ONLY, Action.PREPEND,
        Rule.SPF, SPF_HEADER, asks=("spf",), spf=SPF_PASS, request={"instance": ""}),
    Row("SPF header off: SPF says nothing", {**SPF_ONLY, "spf": {
            "enabled": True, "add_header": False}},
        Action.DUNNO, Rule.NO_CHECKS, asks=("spf",), spf=SPF_PASS),
    Row("no client address to group by: greylisting skipped, rule no_checks", {
            **GREYLIST_ONLY, "spf": {"enabled": True}},
        Action.PREPEND, Rule.NO_CHECKS, "Received-SPF: temperror", asks=("spf",),
        remember="received-spf", spf=SPF_TEMPERROR, request={"client_address": "unknown"}),
    Row("nothing enabled: no opinion", NOTHING_ON, Action.DUNNO, Rule.NO_CHECKS),
    # --- the store fails ---
    Row("store unreachable for the greylist lookup: the default", ALL_ON, Action.DUNNO,
        Rule.DEFAULT, asks=("dnsbl", "spf", "greylist"), failure="store",
        dnsbl=NOT_LISTED, spf=SPF_PASS, greylist=STORE_DOWN),
    Row("the greylist write fails: the default, no header remembered", ALL_ON, Action.DUNNO,
        Rule.DEFAULT, asks=("dnsbl", "spf", "greylist", "write"), failure="store",
        dnsbl=NOT_LISTED, spf=SPF_PASS, greylist=WAITED, write_fails=True),
    Row("the default action comes from the config", {**GREYLIST_ONLY, "policyd": {
            "default_action": "DEFER_IF_PERMIT"}},
        Action.DEFER_IF_PERMIT, Rule.DEFAULT, asks=("greylist",), failure="store",
        greylist=STORE_DOWN),
    Row("nothing written when no record changes, so a failing write is not tried",
        GREYLIST_ONLY, Action.DUNNO, Rule.GREYLIST_KNOWN, asks=("greylist",),
        greylist=WHITELISTED, write_fails=True),
]
# fmt: on


def rcpt(**attrs: str) -> PolicyRequest:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": "192.0.2.10",
        "client_name": "mail.example.org",
        "sender": "alice@example.org",
        "recipient": "bob@example.com",
        "instance": "a1.b2.c3",
        "helo_name": "mail.example.org",
    }
    base.update(attrs)
    return PolicyRequest(base)


def run_order(row: Row) -> tuple[Decision, list[str]]:
    """Drive `next_step` as Pipeline does, answering each lookup from the row."""
    cfg = Config.model_validate(row.config)
    large = parse_large_senders(row.large_senders) if row.large_senders else None
    settings = FilteringSettings.from_config(cfg, large_senders=large)
    lists = CompiledLists.from_entries(ListEntry(n, parse_entry(e)) for n, e in row.entries)
    request = rcpt(**row.request)
    facts = request_facts(request, lists, settings)
    gathered = Gathered(sent_headers=row.sent)
    asked: list[str] = []
    for _ in range(8):
        step = next_step(facts, settings, gathered, row.now)
        if isinstance(step, DnsblLookup):
            assert step.client_address == request.client_address
            assert row.dnsbl is not None, "DNSBL asked for but the row gives no answer"
            asked.append("dnsbl")
            gathered.dnsbl = row.dnsbl
        elif isinstance(step, SpfLookup):
            assert (step.client_address, step.sender, step.helo) == (
                request.client_address,
                request.sender,
                request.helo_name,
            )
            assert row.spf is not None, "SPF asked for but the row gives no answer"
            asked.append("spf")
            gathered.spf = row.spf
        elif isinstance(step, GreylistLookup):
            assert (step.triplet_key, step.client_network) == (KEY, NETWORK)
            assert row.greylist is not None, "greylist asked for but the row gives no answer"
            asked.append("greylist")
            gathered.greylist = row.greylist
        elif step.greylist_write is not None and step.failure is None:
            asked.append("write")
            if not row.write_fails:
                return step, asked
            gathered.greylist_write = STORE_DOWN
        else:
            return step, asked
    raise AssertionError("the order did not decide within 8 steps")


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_filtering_order(row: Row) -> None:
    decision, asked = run_order(row)
    verdict = decision.verdict
    assert (verdict.action, verdict.rule) == (row.action, row.rule)
    assert verdict.text.startswith(row.text)
    assert tuple(asked) == row.asks
    expected_write = None
    if row.writes is not None:
        expected_write = GreylistWrite(KEY, row.writes[0], NETWORK, row.writes[1], EXPIRY)
    assert decision.greylist_write == expected_write
    assert decision.remember_header == row.remember
    assert (decision.failure.kind if decision.failure else None) == row.failure


def test_every_row_has_a_unique_name() -> None:
    assert len({row.name for row in ROWS}) == len(ROWS)


def test_a_failed_request_answers_the_configured_default() -> None:
    cfg = Config.model_validate({"policyd": {"default_action": "DEFER_IF_PERMIT"}})
    timeout = Unavailable("timeout", "no verdict within 10s")
    decision = failed(FilteringSettings.from_config(cfg), timeout)
    assert (decision.verdict.action, decision.verdict.rule) == (
        Action.DEFER_IF_PERMIT,
        Rule.DEFAULT,
    )
    assert decision.failure == timeout and decision.greylist_write is None


def test_a_step_without_a_checker_is_off_even_when_configured() -> None:
    cfg = Config.model_validate(ALL_ON)
    settings = FilteringSettings.from_config(cfg, dnsbl=False, spf=False)
    facts = request_facts(rcpt(), CompiledLists.from_entries(()), settings)
    step = next_step(facts, settings, Gathered(), NOW)
    assert step == GreylistLookup(KEY, NETWORK)


def test_header_names_are_compared_case_insensitively() -> None:
    assert header_name("Received-SPF: pass (x) y=z") == "received-spf"
    assert header_name(" X-Greylist : delayed") == "x-greylist"
