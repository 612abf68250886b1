"""DNSBL edges against the real NSD: a list that lists 127.0.0.1, SERVFAIL, silence.

RFC 5782 section 5: a working list lists 127.0.0.2 and does not list 127.0.0.1. A zone that
answers for 127.0.0.1 answers for everyone (a wildcard: a list shut down on purpose, or a
lapsed domain bought by someone else); counting it would refuse every client.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from postwarden.config.model import DnsblConfig, DnsblZone, DnsConfig
from postwarden.dns.resolver import make_resolver
from postwarden.policy.dnsbl import PROBE_INTERVAL, DnsblChecker, DnsblResult, verdict_for
from tests.fixtures.dns_server import DNSBL_ZONE, SERVFAIL_ZONE, WILDCARD_ZONE, DnsServer

# The most a lookup may take here: the budget plus a generous margin for a loaded machine.
# Only "answered before this bound" is asserted; measured figures are in the README.
BOUND_MARGIN = 3.0
LOGGER = "postwarden.policy.dnsbl"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _checker(
    nameserver: str, *zones: DnsblZone, budget: float = 2.0, dns_timeout: float = 2.0
) -> tuple[DnsblChecker, DnsblConfig, FakeClock]:
    cfg = DnsblConfig(enabled=True, zones=list(zones), budget=budget)
    resolver = make_resolver(DnsConfig(nameservers=[nameserver], timeout=dns_timeout))
    clock = FakeClock()
    return DnsblChecker(cfg, resolver, clock=clock), cfg, clock


async def _check(checker: DnsblChecker, ip: str) -> DnsblResult:
    """One lookup, which must be answered within the budget plus the margin."""
    return await asyncio.wait_for(checker.check(ip), checker.cfg.budget + BOUND_MARGIN)


def _alerts(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


SANE = ["2.0.0.127 A 127.0.0.2", "1.2.0.192 A 127.0.0.2"]
WILDCARD = ["* A 127.0.0.2"]


# --- a list that lists 127.0.0.1 ----------------------------------------------------------


async def test_a_wildcard_list_is_disabled_from_the_first_request_with_one_alert(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    checker, cfg, clock = _checker(
        dns_server.nameserver, DnsblZone(zone=WILDCARD_ZONE), DnsblZone(zone=DNSBL_ZONE)
    )
    clients = ["198.51.100.77", "203.0.113.9", "192.0.2.200", "2001:db8::77"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        results = []
        for _ in range(3):  # three rounds, the last two after a new probe each
            results += [await _check(checker, ip) for ip in clients]
            clock.now += PROBE_INTERVAL
    for result in results:
        assert result.score == 0
        assert result.disabled == (WILDCARD_ZONE,)
        assert verdict_for(result, cfg) is None
    alerts = _alerts(caplog, "lists 127.0.0.1")
    assert len(alerts) == 1
    assert alerts[0].startswith(f"dnsbl: {WILDCARD_ZONE} lists 127.0.0.1 (answered 127.0.0.2)")
    # The other, working list still counts beside it.
    listed = await _check(checker, "127.0.0.2")
    assert listed.listed == ((DNSBL_ZONE, "127.0.0.2"),)
    assert listed.disabled == (WILDCARD_ZONE,)


async def test_a_disabled_list_is_asked_only_about_127_0_0_1_once_per_interval(
    dns_server: DnsServer,
) -> None:
    checker, _, clock = _checker(dns_server.nameserver, DnsblZone(zone=WILDCARD_ZONE))
    await _check(checker, "198.51.100.1")
    assert (checker.queries, checker.probes) == (1, 1)
    for n in range(2, 12):  # within the interval: no query at all, neither client nor probe
        clock.now += PROBE_INTERVAL / 20
        assert (await _check(checker, f"198.51.100.{n}")).score == 0
    assert (checker.queries, checker.probes) == (1, 1)
    clock.now += PROBE_INTERVAL
    assert (await _check(checker, "198.51.100.20")).score == 0
    assert (checker.queries, checker.probes) == (2, 2)


async def test_a_list_that_turns_wildcard_is_disabled_then_enabled_when_it_behaves(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    zone = "turncoat-bl.test"
    dns_server.set_zone(zone, SANE)
    checker, cfg, clock = _checker(dns_server.nameserver, DnsblZone(zone=zone))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert (await _check(checker, "192.0.2.1")).score == 1  # listed, and cached 60 s
        assert (await _check(checker, "203.0.113.5")).score == 0
        dns_server.set_zone(zone, WILDCARD)
        # Until the next probe the wildcard counts: PROBE_INTERVAL bounds that window.
        assert (await _check(checker, "203.0.113.6")).score == 1
        clock.now += PROBE_INTERVAL
        hostile = await _check(checker, "203.0.113.7")
        assert (hostile.score, hostile.disabled) == (0, (zone,))
        # The listing cached before is not counted either while the list is disabled.
        assert (await _check(checker, "192.0.2.1")).score == 0
        assert len(_alerts(caplog, "lists 127.0.0.1")) == 1
        dns_server.set_zone(zone, SANE)
        clock.now += PROBE_INTERVAL
        behaving = await _check(checker, "192.0.2.1")
        assert (behaving.score, behaving.disabled) == (1, ())
        # Nothing the wildcard said (203.0.113.6 was cached while it seemed sane) survives.
        assert (await _check(checker, "203.0.113.6")).score == 0
        assert verdict_for(await _check(checker, "192.0.2.1"), cfg) is not None
    assert len(_alerts(caplog, "no longer lists 127.0.0.1")) == 1
    assert len(_alerts(caplog, "lists 127.0.0.1 (")) == 1


async def test_a_refusal_for_127_0_0_1_does_not_disable_a_list(dns_server: DnsServer) -> None:
    # Spamhaus answers 127.255.255.254 to every query from a public resolver, 127.0.0.1's
    # too: that is about our resolver, and those answers never count anyway.
    zone = "refusing-bl.test"
    dns_server.set_zone(zone, ["* A 127.255.255.254", "1.2.0.192 A 127.0.0.2"])
    checker, _, _ = _checker(dns_server.nameserver, DnsblZone(zone=zone))
    result = await _check(checker, "192.0.2.1")
    assert (result.score, result.disabled) == (1, ())


async def test_a_probe_that_gets_no_answer_leaves_the_list_as_it_was(
    dns_server: DnsServer,
) -> None:
    checker, _, _ = _checker(
        dns_server.blackhole_nameserver, DnsblZone(zone=DNSBL_ZONE), budget=0.3
    )
    result = await _check(checker, "127.0.0.2")
    assert (result.score, result.disabled, result.timed_out) == (0, (), (DNSBL_ZONE,))


# --- SERVFAIL and silence: not listed, within the budget -----------------------------------


async def test_a_servfail_zone_counts_as_not_listed_and_is_not_cached(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    checker, cfg, _ = _checker(
        dns_server.nameserver, DnsblZone(zone=SERVFAIL_ZONE, weight=5), DnsblZone(zone=DNSBL_ZONE)
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = await _check(checker, "127.0.0.2")
        again = await _check(checker, "127.0.0.2")
    assert result.score == 1  # DNSBL_ZONE's weight only
    assert result.errors == (f"{SERVFAIL_ZONE}: NoNameservers",)
    assert result.disabled == ()  # SERVFAIL for 127.0.0.1 too: not a listing
    assert verdict_for(result, cfg) is not None
    assert again.errors == result.errors
    assert checker.queries == 3  # SERVFAIL asked again; DNSBL_ZONE's answer from the cache
    assert len(_alerts(caplog, "NoNameservers")) == 1  # once a minute, not per request


@pytest.mark.parametrize("budget", [0.3, 1.0])
async def test_a_nameserver_that_never_answers_is_waited_for_only_the_budget(
    dns_server: DnsServer, budget: float
) -> None:
    # dns.timeout is longer than the budget: the budget, not the resolver, ends the wait.
    checker, _, _ = _checker(
        dns_server.blackhole_nameserver,
        DnsblZone(zone=DNSBL_ZONE),
        DnsblZone(zone=SERVFAIL_ZONE),
        budget=budget,
        dns_timeout=10.0,
    )
    result = await _check(checker, "127.0.0.2")
    assert result.score == 0
    assert set(result.timed_out) == {DNSBL_ZONE, SERVFAIL_ZONE}


async def test_concurrent_requests_share_one_probe(dns_server: DnsServer) -> None:
    checker, _, _ = _checker(dns_server.nameserver, DnsblZone(zone=WILDCARD_ZONE))
    clients = [f"198.51.100.{n}" for n in range(1, 21)]
    results = await asyncio.wait_for(
        asyncio.gather(*(checker.check(ip) for ip in clients)), 2.0 + BOUND_MARGIN
    )
    assert [r.score for r in results] == [0] * 20
    assert checker.probes == 1
