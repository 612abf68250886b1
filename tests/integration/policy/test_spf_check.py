"""SPF checks through pyspf against the real test DNS server (NSD on loopback)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

from postwarden.config.model import DnsConfig, SpfConfig
from postwarden.policy.spf_check import SpfChecker, verdict_for
from postwarden.policy.verdict import Action, Rule
from tests.fixtures.dns_server import SPF_ZONE, DnsServer

RECEIVER = "mx.postwarden.test"


@pytest.fixture
def checker(dns_server: DnsServer) -> Iterator[SpfChecker]:
    spf = SpfChecker(
        SpfConfig(enabled=True, timeout=3),
        DnsConfig(nameservers=[dns_server.nameserver], timeout=2),
        receiver=RECEIVER,
    )
    yield spf
    spf.close()


@pytest.mark.parametrize(
    ("ip", "mechanism"),
    [
        ("192.0.2.10", '"ip4:192.0.2.10"'),
        ("192.0.2.20", '"include:inc.spf.test"'),
        ("192.0.2.30", '"a:mail.spf.test"'),
        ("192.0.2.40", "mx"),
    ],
)
async def test_authorised_hosts_pass(checker: SpfChecker, ip: str, mechanism: str) -> None:
    result = await checker.check(ip, "alice@pass.spf.test", "mail.example.test")
    assert result.result == "pass"
    assert f"; mechanism={mechanism}; identity=mailfrom" in result.received_spf


async def test_other_host_fails_and_is_rejected_550_5_7_23(checker: SpfChecker) -> None:
    result = await checker.check("198.51.100.99", "alice@pass.spf.test", "mail.example.test")
    assert result.result == "fail"
    verdict = verdict_for(result, SpfConfig(enabled=True, fail_action="reject"))
    assert verdict is not None
    assert verdict.action is Action.REJECT
    assert verdict.rule is Rule.SPF_FAIL
    assert (verdict.smtp_code, verdict.enhanced_code) == (550, "5.7.23")


async def test_fail_only_marked_when_configured(checker: SpfChecker) -> None:
    result = await checker.check("198.51.100.99", "alice@pass.spf.test", "mail.example.test")
    verdict = verdict_for(result, SpfConfig(enabled=True, fail_action="mark"))
    assert verdict is not None
    assert verdict.action is Action.PREPEND
    assert verdict.rule is Rule.SPF
    assert verdict.text.startswith("Received-SPF: fail (")


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("softfail.spf.test", "softfail"),
        ("neutral.spf.test", "neutral"),
        ("none.spf.test", "none"),
        ("nonexistent.spf.test", "none"),
        ("permerror.spf.test", "permerror"),
        ("twice.spf.test", "permerror"),
    ],
)
async def test_each_result(checker: SpfChecker, domain: str, expected: str) -> None:
    result = await checker.check("198.51.100.99", f"bob@{domain}", "mail.example.test")
    assert result.result == expected
    verdict = verdict_for(result, SpfConfig(enabled=True))
    assert verdict is not None
    assert verdict.action is Action.PREPEND
    assert verdict.text == result.received_spf


async def test_header_format_rfc7208(checker: SpfChecker) -> None:
    result = await checker.check("192.0.2.10", "alice@pass.spf.test", "mail.example.test")
    assert result.received_spf == (
        "Received-SPF: pass (mx.postwarden.test: domain of pass.spf.test designates"
        " 192.0.2.10 as permitted sender) client-ip=192.0.2.10;"
        ' envelope-from="alice@pass.spf.test"; helo=mail.example.test;'
        ' receiver=mx.postwarden.test; mechanism="ip4:192.0.2.10"; identity=mailfrom'
    )


async def test_permerror_header_names_the_problem(checker: SpfChecker) -> None:
    result = await checker.check("192.0.2.10", "bob@permerror.spf.test", "h.example.test")
    assert result.received_spf.startswith(
        "Received-SPF: permerror (mx.postwarden.test: permanent error in processing domain"
        " of permerror.spf.test: "
    )
    assert "problem=" in result.received_spf


async def test_null_sender_is_checked_as_postmaster_at_helo(checker: SpfChecker) -> None:
    passed = await checker.check("192.0.2.50", "", "helo.spf.test")
    assert passed.result == "pass"
    assert 'envelope-from="postmaster@helo.spf.test"' in passed.received_spf
    failed = await checker.check("192.0.2.51", "", "helo.spf.test")
    assert failed.result == "fail"


async def test_null_sender_without_helo_is_none(checker: SpfChecker) -> None:
    result = await checker.check("192.0.2.50", "", "")
    assert result.result == "none"


async def test_records_published_at_runtime_are_used(
    dns_server: DnsServer, checker: SpfChecker
) -> None:
    dns_server.set_zone("spf-runtime.test", ['@ TXT "v=spf1 ip6:2001:db8::/32 -all"'])
    result = await checker.check("2001:db8::25", "x@spf-runtime.test", "h.example.test")
    assert result.result == "pass"
    assert 'client-ip="2001:db8::25"' in result.received_spf


async def test_silent_nameserver_gives_temperror_within_the_timeout(
    dns_server: DnsServer,
) -> None:
    spf = SpfChecker(
        SpfConfig(enabled=True, timeout=0.5),
        DnsConfig(nameservers=[dns_server.blackhole_nameserver], timeout=5),
        receiver=RECEIVER,
    )
    try:
        started = time.monotonic()
        result = await spf.check("192.0.2.10", "alice@pass.spf.test", "mail.example.test")
        assert time.monotonic() - started < 1.5
    finally:
        spf.close()
    assert result.result == "temperror"
    assert result.received_spf.startswith("Received-SPF: temperror (")
    verdict = verdict_for(result, SpfConfig(enabled=True))
    assert verdict is not None
    assert verdict.action is Action.PREPEND


async def test_dns_timeout_inside_pyspf_is_temperror(dns_server: DnsServer) -> None:
    # The resolver gives up (0.3 s) before the SPF bound (3 s): pyspf itself says temperror.
    spf = SpfChecker(
        SpfConfig(enabled=True, timeout=3),
        DnsConfig(nameservers=[dns_server.blackhole_nameserver], timeout=0.3),
    )
    try:
        result = await spf.check("192.0.2.10", "alice@pass.spf.test", "mail.example.test")
    finally:
        spf.close()
    assert result.result == "temperror"


async def test_queries_go_to_the_configured_nameserver_only(dns_server: DnsServer) -> None:
    before = dns_server.blackhole_queries
    spf = SpfChecker(
        SpfConfig(enabled=True, timeout=1),
        DnsConfig(nameservers=[dns_server.blackhole_nameserver], timeout=0.3),
    )
    try:
        await spf.check("192.0.2.10", "alice@pass.spf.test", "mail.example.test")
    finally:
        spf.close()
    deadline = time.monotonic() + 2
    while dns_server.blackhole_queries == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dns_server.blackhole_queries > before


async def test_unparsable_client_address_is_temperror_not_a_crash(checker: SpfChecker) -> None:
    result = await checker.check("unknown", "alice@pass.spf.test", "mail.example.test")
    assert result.result == "temperror"
    assert result.explanation == "invalid client address"


async def test_ipv4_mapped_client_is_checked_as_ipv4(checker: SpfChecker) -> None:
    result = await checker.check("::ffff:192.0.2.10", "alice@pass.spf.test", "mail.example.test")
    assert result.result == "pass"
    assert "client-ip=192.0.2.10;" in result.received_spf


# -- slow DNS (issue 14, item 8) ---------------------------------------------------------------
# A name outside NSD's zones is REFUSED there, and the resolver then asks the next configured
# server, the black hole, which never answers: those names time out, the test zones answer.
UNSERVED = "unserved.test"


@pytest.fixture
def exp_times_out(dns_server: DnsServer) -> str:
    """RFC 7208 test suite case exp-dns-error: fail, with an exp= name that times out."""
    dns_server.add_records(SPF_ZONE, [f'e21 TXT "v=spf1 exp=e21msg.{UNSERVED} -all"'])
    return f"foo@e21.{SPF_ZONE}"


@pytest.mark.parametrize(("spf_timeout", "dns_timeout"), [(1.0, 1.0), (0.8, 1.0)])
async def test_exp_lookup_timing_out_keeps_fail_when_spf_timeout_is_not_longer(
    dns_server: DnsServer, exp_times_out: str, spf_timeout: float, dns_timeout: float
) -> None:
    # The exp= lookup is the last one and runs until the end of the budget: its own
    # timeout (ignored, RFC 7208 section 6.2) decides, not the overall limit.
    spf = SpfChecker(
        SpfConfig(enabled=True, timeout=spf_timeout),
        DnsConfig(
            nameservers=[dns_server.nameserver, dns_server.blackhole_nameserver],
            timeout=dns_timeout,
        ),
        receiver=RECEIVER,
    )
    try:
        result = await spf.check("1.2.3.4", exp_times_out, "mail.example.test")
    finally:
        spf.close()
    assert result.result == "fail"


async def test_senders_whose_dns_never_answers_leave_others_their_result(
    dns_server: DnsServer,
) -> None:
    # Issue 14: 48 such senders filled the 16 SPF workers and an unrelated sender got
    # temperror. Here they hold a few threads while the other sender is answered.
    before = dns_server.blackhole_queries
    spf = SpfChecker(
        SpfConfig(enabled=True, timeout=3),
        DnsConfig(nameservers=[dns_server.nameserver, dns_server.blackhole_nameserver], timeout=2),
        receiver=RECEIVER,
    )
    try:
        slow = [
            asyncio.ensure_future(spf.check(f"198.51.100.{n}", f"u{n}@slow.{UNSERVED}", "h"))
            for n in range(1, 49)
        ]
        # They asked first: their lookups are waiting on the black hole.
        for _ in range(500):
            if dns_server.blackhole_queries >= before + 4:
                break
            await asyncio.sleep(0.01)
        good = await spf.check("192.0.2.10", "alice@pass.spf.test", "mail.example.test")
        slow_results = await asyncio.wait_for(asyncio.gather(*slow), 10)
    finally:
        spf.close()
    assert good.result == "pass"
    assert {r.result for r in slow_results} == {"temperror"}


async def test_temperror_shows_neither_the_resolver_nor_the_dns_library(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    spf = SpfChecker(
        SpfConfig(enabled=True, timeout=3),
        DnsConfig(nameservers=[dns_server.blackhole_nameserver], timeout=0.3),
        receiver=RECEIVER,
    )
    try:
        with caplog.at_level(logging.INFO, logger="postwarden.spf"):
            result = await spf.check("192.0.2.10", "alice@pass.spf.test", "mail.example.test")
    finally:
        spf.close()
    assert result.result == "temperror"
    port = dns_server.blackhole_nameserver.rpartition(":")[2]
    for shown in (result.received_spf, result.explanation):
        assert port not in shown
        assert "Do53" not in shown
        assert "LifetimeTimeout" not in shown
    assert result.received_spf == (
        "Received-SPF: temperror (mx.postwarden.test: temporary error in processing during"
        " lookup of pass.spf.test: DNS lookup failed) client-ip=192.0.2.10;"
        ' envelope-from="alice@pass.spf.test"; helo=mail.example.test;'
        ' receiver=mx.postwarden.test; problem="DNS lookup failed"; identity=mailfrom'
    )
    # Our own log line keeps the detail for the operator.
    assert any(f"@{port}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("domain", ["\u2603.spf.test", "exa..mple.test", "localhost"])
async def test_malformed_sender_domain_is_none_without_a_query(
    dns_server: DnsServer, domain: str
) -> None:
    before = dns_server.blackhole_queries
    spf = SpfChecker(
        SpfConfig(enabled=True, timeout=3),
        DnsConfig(nameservers=[dns_server.blackhole_nameserver], timeout=0.3),
    )
    try:
        result = await spf.check("192.0.2.10", f"a@{domain}", "mail.example.test")
    finally:
        spf.close()
    assert result.result == "none"
    assert dns_server.blackhole_queries == before
