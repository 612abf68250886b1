"""DNSBL checks against the real test DNS server (NSD on loopback)."""

from __future__ import annotations

import logging
import time

import pytest

from postwarden.config.model import DnsblConfig, DnsblZone, DnsConfig
from postwarden.dns.resolver import make_resolver
from postwarden.policy.dnsbl import DnsblChecker, verdict_for
from postwarden.policy.verdict import Action, Rule
from tests.fixtures.dns_server import DNSBL2_ZONE, DNSBL_ZONE, NEGATIVE_TTL, DnsServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _checker(
    server: DnsServer,
    *zones: DnsblZone,
    threshold: int = 1,
    budget: float = 2.0,
    nameserver: str | None = None,
    clock: FakeClock | None = None,
) -> tuple[DnsblChecker, DnsblConfig]:
    cfg = DnsblConfig(enabled=True, zones=list(zones), threshold=threshold, budget=budget)
    resolver = make_resolver(DnsConfig(nameservers=[nameserver or server.nameserver], timeout=2))
    return DnsblChecker(cfg, resolver, clock=clock or FakeClock()), cfg


ZONE1 = DnsblZone(zone=DNSBL_ZONE, weight=2)
ZONE2 = DnsblZone(zone=DNSBL2_ZONE, weight=1, codes=["127.0.1.2-127.0.1.3"])


async def test_rfc5782_test_entry_is_listed_and_127_0_0_1_is_not(dns_server: DnsServer) -> None:
    checker, cfg = _checker(dns_server, ZONE1)
    listed = await checker.check("127.0.0.2")
    assert listed.listed == ((DNSBL_ZONE, "127.0.0.2"),)
    assert listed.score == 2
    clean = await checker.check("127.0.0.1")
    assert clean.score == 0
    assert clean.listed == ()
    assert verdict_for(clean, cfg) is None


async def test_listed_client_is_rejected_naming_the_zone(dns_server: DnsServer) -> None:
    checker, cfg = _checker(dns_server, ZONE1, threshold=2)
    verdict = verdict_for(await checker.check("198.51.100.7"), cfg)
    assert verdict is not None
    assert verdict.action is Action.REJECT
    assert verdict.rule is Rule.DNSBL
    assert verdict.smtp_code == 554
    assert DNSBL_ZONE in verdict.text


async def test_ipv6_client_is_asked_in_nibble_form(dns_server: DnsServer) -> None:
    checker, _ = _checker(dns_server, ZONE1)
    assert (await checker.check("2001:db8::2")).listed == ((DNSBL_ZONE, "127.0.0.2"),)
    assert (await checker.check("2001:db8::3")).score == 0


async def test_ipv4_mapped_client_is_asked_as_ipv4(dns_server: DnsServer) -> None:
    checker, _ = _checker(dns_server, ZONE1)
    assert (await checker.check("::ffff:192.0.2.1")).listed == ((DNSBL_ZONE, "127.0.0.2"),)


async def test_weights_across_two_zones_reach_the_threshold(dns_server: DnsServer) -> None:
    checker, cfg = _checker(dns_server, ZONE1, ZONE2, threshold=3)
    both = await checker.check("192.0.2.1")  # 127.0.0.2 in zone 1, 127.0.1.2 in zone 2
    assert both.score == 3
    assert both.zones == (DNSBL_ZONE, DNSBL2_ZONE)
    verdict = verdict_for(both, cfg)
    assert verdict is not None
    assert verdict.text == f"Client host blocked using DNSBL: {DNSBL_ZONE}, {DNSBL2_ZONE}"
    # Zone 2 answers 127.0.1.4 for this one: outside its filter, so only zone 1's weight.
    one = await checker.check("192.0.2.2")
    assert one.score == 2
    assert verdict_for(one, cfg) is None


async def test_several_codes_from_one_zone_count_once(dns_server: DnsServer) -> None:
    checker, _ = _checker(dns_server, ZONE1)
    result = await checker.check("192.0.2.3")
    assert result.score == 2
    assert result.listed == ((DNSBL_ZONE, "127.0.0.10"), (DNSBL_ZONE, "127.0.0.11"))


async def test_answer_outside_127_8_is_not_a_listing(dns_server: DnsServer) -> None:
    checker, _ = _checker(dns_server, ZONE1)
    assert (await checker.check("192.0.2.97")).score == 0


async def test_resolver_refused_answer_is_ignored_and_logged_once(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    wide = DnsblZone(zone=DNSBL_ZONE, weight=5, codes=["127.0.0.0-127.255.255.255"])
    checker, cfg = _checker(dns_server, wide)
    with caplog.at_level(logging.WARNING, logger="postwarden.policy.dnsbl"):
        first = await checker.check("192.0.2.99")  # 127.255.255.254
        second = await checker.check("192.0.2.98")  # 127.255.255.252
    assert first.score == second.score == 0
    assert verdict_for(first, cfg) is None
    assert first.errors == (f"{DNSBL_ZONE}: resolver refused (127.255.255.254)",)
    refusals = [r for r in caplog.records if "refuses our resolver" in r.getMessage()]
    assert len(refusals) == 1


async def test_answers_are_cached_until_their_ttl(dns_server: DnsServer) -> None:
    dns_server.set_zone("cache-bl.test", ["1.2.0.192 60 A 127.0.0.2"])
    clock = FakeClock()
    checker, _ = _checker(dns_server, DnsblZone(zone="cache-bl.test"), clock=clock)
    assert (await checker.check("192.0.2.1")).score == 1
    assert (checker.queries, checker.cache_hits) == (1, 0)
    # Delisted at the DNSBL: the cached answer still stands within its 60 s TTL ...
    dns_server.set_zone("cache-bl.test", [])
    clock.now += 59
    assert (await checker.check("192.0.2.1")).score == 1
    assert (checker.queries, checker.cache_hits) == (1, 1)
    # ... and is asked again once the TTL has run out.
    clock.now += 2
    assert (await checker.check("192.0.2.1")).score == 0
    assert checker.queries == 2


async def test_nxdomain_is_cached_by_the_negative_ttl(dns_server: DnsServer) -> None:
    dns_server.set_zone("cache-nx.test", [])
    clock = FakeClock()
    checker, _ = _checker(dns_server, DnsblZone(zone="cache-nx.test"), clock=clock)
    assert (await checker.check("192.0.2.5")).score == 0
    dns_server.add_records("cache-nx.test", ["5.2.0.192 A 127.0.0.2"])
    clock.now += NEGATIVE_TTL - 1
    assert (await checker.check("192.0.2.5")).score == 0
    assert checker.queries == 1
    clock.now += 2
    assert (await checker.check("192.0.2.5")).score == 1
    assert checker.queries == 2


async def test_cache_is_bounded(dns_server: DnsServer) -> None:
    cfg = DnsblConfig(enabled=True, zones=[ZONE1])
    resolver = make_resolver(DnsConfig(nameservers=[dns_server.nameserver]))
    checker = DnsblChecker(cfg, resolver, clock=FakeClock(), cache_size=2)
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1"):
        await checker.check(ip)
    assert checker.queries == 4  # 192.0.2.1 was evicted by the two after it


async def test_silent_nameserver_counts_as_not_listed_within_the_budget(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    checker, cfg = _checker(
        dns_server, ZONE1, ZONE2, budget=0.4, nameserver=dns_server.blackhole_nameserver
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="postwarden.policy.dnsbl"):
        result = await checker.check("127.0.0.2")
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    assert result.score == 0
    assert set(result.timed_out) == {DNSBL_ZONE, DNSBL2_ZONE}
    assert verdict_for(result, cfg) is None
    assert any("did not answer" in r.getMessage() for r in caplog.records)
    # A timeout is not cached: the next check asks again.
    await checker.check("127.0.0.2")
    assert checker.queries == 4


async def test_zones_are_asked_in_parallel(dns_server: DnsServer) -> None:
    # Four zones on a silent server, budget 0.5 s: sequential asking would take 2 s.
    zones = [DnsblZone(zone=f"z{n}.example") for n in range(4)]
    checker, _ = _checker(
        dns_server, *zones, budget=0.5, nameserver=dns_server.blackhole_nameserver
    )
    started = time.monotonic()
    result = await checker.check("192.0.2.1")
    assert time.monotonic() - started < 1.0
    assert len(result.timed_out) == 4


async def test_zone_the_server_refuses_is_an_error_not_a_listing(dns_server: DnsServer) -> None:
    checker, _ = _checker(dns_server, DnsblZone(zone="not-served.example"), ZONE1)
    result = await checker.check("127.0.0.2")
    assert result.score == 2  # ZONE1's weight only
    assert result.listed == ((DNSBL_ZONE, "127.0.0.2"),)
    assert result.errors == ("not-served.example: NoNameservers",)


async def test_unparsable_client_address_is_not_looked_up(dns_server: DnsServer) -> None:
    checker, _ = _checker(dns_server, ZONE1)
    result = await checker.check("unknown")
    assert result.score == 0
    assert checker.queries == 0
    assert result.errors == ("not an IP address: 'unknown'",)
