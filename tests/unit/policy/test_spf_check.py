"""The Received-SPF header (RFC 7208 section 9.1), the SPF verdict and the checker, without DNS."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest

from policyd.policy_codec import MAX_HEADER_LENGTH
from postwarden.config.model import DnsConfig, SpfConfig
from postwarden.policy import spf_check
from postwarden.policy.spf_check import (
    SpfResult,
    header_comment,
    mail_from_identity,
    received_spf_header,
    verdict_for,
)
from postwarden.policy.verdict import Action, Rule


def test_rfc7208_example_shape() -> None:
    header = received_spf_header(
        "pass",
        client_ip="192.0.2.1",
        envelope_from="myname@example.com",
        helo="foo.example.com",
        receiver="mybox.example.org",
    )
    assert header == (
        "Received-SPF: pass (mybox.example.org: domain of example.com designates 192.0.2.1"
        ' as permitted sender) client-ip=192.0.2.1; envelope-from="myname@example.com";'
        " helo=foo.example.com; receiver=mybox.example.org; identity=mailfrom"
    )


def test_ipv6_client_ip_is_quoted() -> None:
    header = received_spf_header(
        "none", client_ip="2001:db8::1", envelope_from="a@b.test", helo="h"
    )
    assert 'client-ip="2001:db8::1";' in header
    assert "receiver=" not in header


def test_untrusted_values_cannot_break_the_header() -> None:
    header = received_spf_header(
        "fail",
        client_ip="192.0.2.1",
        envelope_from='x"y@evil(.test\r\nX-Injected: yes',
        helo="helo\r\nX-Other: 1",
        receiver="mx.test",
    )
    assert "\r" not in header
    assert "\n" not in header
    comment = header[header.index("(") : header.index(")") + 1]
    assert comment.count("(") == 1
    assert 'envelope-from="x\\"y@evil(.testX-Injected: yes";' in header
    assert 'helo="heloX-Other: 1";' in header


def test_problem_only_for_errors() -> None:
    err = received_spf_header(
        "permerror", client_ip="192.0.2.1", envelope_from="a@b.test", helo="h", problem="bad x"
    )
    assert 'problem="bad x"' in err
    ok = received_spf_header(
        "pass", client_ip="192.0.2.1", envelope_from="a@b.test", helo="h", problem="bad x"
    )
    assert "problem=" not in ok


@pytest.mark.parametrize(
    "result", ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
)
def test_every_result_has_a_comment_naming_the_domain(result: str) -> None:
    assert "b.test" in header_comment(result, "b.test", "192.0.2.1", "why")


def test_null_sender_becomes_postmaster_at_helo() -> None:
    assert mail_from_identity("", "mx.example.org") == "postmaster@mx.example.org"
    assert mail_from_identity("a@b.test", "mx.example.org") == "a@b.test"
    assert mail_from_identity("", "") == ""


FAIL = SpfResult("fail", "SPF fail - not authorized", "Received-SPF: fail (...) identity=mailfrom")
PASS = SpfResult("pass", "sender SPF authorized", "Received-SPF: pass (...) identity=mailfrom")


def test_fail_rejects_550_5_7_23_when_configured() -> None:
    verdict = verdict_for(FAIL, SpfConfig(enabled=True, fail_action="reject"))
    assert verdict is not None
    assert (verdict.action, verdict.rule) == (Action.REJECT, Rule.SPF_FAIL)
    assert (verdict.smtp_code, verdict.enhanced_code) == (550, "5.7.23")
    assert "not authorized" in verdict.text


def test_fail_marks_when_configured() -> None:
    verdict = verdict_for(FAIL, SpfConfig(enabled=True, fail_action="mark"))
    assert verdict is not None
    assert (verdict.action, verdict.rule, verdict.text) == (
        Action.PREPEND,
        Rule.SPF,
        FAIL.received_spf,
    )


def test_no_header_when_disabled() -> None:
    assert verdict_for(PASS, SpfConfig(enabled=True, add_header=False)) is None
    assert verdict_for(FAIL, SpfConfig(enabled=True, fail_action="mark", add_header=False)) is None


def test_reject_text_has_no_control_characters() -> None:
    evil = SpfResult("fail", "go away\r\n250 OK", "Received-SPF: fail")
    verdict = verdict_for(evil, SpfConfig(enabled=True))
    assert verdict is not None
    assert "\r" not in verdict.text
    assert "\n" not in verdict.text


async def test_closing_the_checker_on_reload_still_answers_queued_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(_resolver: object, ip: str, identity: str, *_rest: object) -> SpfResult:
        started.set()
        release.wait(5)  # a bound, never reached: the test sets it
        return SpfResult("pass", "ok", f"Received-SPF: pass client-ip={ip}")

    monkeypatch.setattr(spf_check, "_evaluate", slow)
    checker = spf_check.SpfChecker(
        SpfConfig(enabled=True, timeout=5), DnsConfig(nameservers=["127.0.0.1"]), workers=1
    )
    running = asyncio.ensure_future(checker.check("192.0.2.1", "a@example.org", "h"))
    queued = asyncio.ensure_future(checker.check("192.0.2.2", "b@example.org", "h"))
    # One check in the only thread (the other, handed in with it, waits for that thread).
    assert await asyncio.to_thread(started.wait, 5)
    checker.close()  # what a SIGHUP reload does to the old checker
    release.set()
    results = await asyncio.wait_for(asyncio.gather(running, queued), 5)
    assert [r.result for r in results] == ["pass", "pass"]


async def test_no_result_within_the_time_budget_is_temperror(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    started = threading.Event()
    timers: list[tuple[float, asyncio.Timeout]] = []

    def hanging(*_args: object) -> SpfResult:
        started.set()
        release.wait(5)  # a bound, never reached: the test sets it
        return SpfResult("pass", "too late", "Received-SPF: pass")

    def timer(seconds: float) -> asyncio.Timeout:
        timeout = asyncio.timeout(None)  # never expires by itself: the test expires it
        timers.append((seconds, timeout))
        return timeout

    monkeypatch.setattr(spf_check, "_evaluate", hanging)
    checker = spf_check.SpfChecker(
        SpfConfig(enabled=True, timeout=4),
        DnsConfig(nameservers=["127.0.0.1"]),
        receiver="mx.example.org",
        workers=1,
        timer=timer,
    )
    checking = asyncio.ensure_future(checker.check("192.0.2.1", "a@example.org", "h"))
    assert await asyncio.to_thread(started.wait, 5)
    [(seconds, timeout)] = timers
    assert seconds == 4 + spf_check.GRACE  # spf.timeout, and the backstop's grace
    timeout.reschedule(asyncio.get_running_loop().time())  # the budget runs out now
    result = await asyncio.wait_for(checking, 5)
    release.set()
    checker.close()
    assert result.result == "temperror"
    assert result.received_spf.startswith("Received-SPF: temperror")
    assert 'problem="DNS lookup timed out"' in result.received_spf


# -- slow and broken DNS (issue 14 item 8), through a fake resolver --------------------------


class FakeResolver:
    """Stands in for the `[dns]` resolver pyspf's lookups go through.

    `records` maps (name, qtype) to rdata texts; any other name is NXDOMAIN. A name in
    `silent` never answers: `on_silent(name, lifetime)` runs, then the lookup times out as
    dnspython's does, naming an internal server in its message.
    """

    lifetime = 30.0
    SERVER = "Do53:10.53.0.1@53"

    def __init__(
        self,
        records: dict[tuple[str, str], list[str]],
        *,
        silent: Callable[[str], bool] = lambda _name: False,
        on_silent: Callable[[str, float], None] = lambda _name, _lifetime: None,
    ) -> None:
        self.records = records
        self.silent = silent
        self.on_silent = on_silent
        self.lifetimes: list[tuple[str, float]] = []

    def resolve(self, name: str, qtype: str, lifetime: float) -> list[dns.rdata.Rdata]:
        self.lifetimes.append((name, lifetime))
        if self.silent(name):
            self.on_silent(name, lifetime)
            raise dns.resolver.LifetimeTimeout(
                timeout=lifetime, errors=[(self.SERVER, False, 53, dns.exception.Timeout(), None)]
            )
        key = (name.lower().rstrip("."), qtype)
        if key not in self.records:
            raise dns.resolver.NXDOMAIN
        kind = dns.rdatatype.from_text(qtype)
        return [dns.rdata.from_text(dns.rdataclass.IN, kind, text) for text in self.records[key]]


def _checker(
    resolver: FakeResolver,
    *,
    spf_timeout: float,
    dns_timeout: float,
    timer: Callable[[float], asyncio.Timeout] = asyncio.timeout,
    **kwargs: Any,
) -> spf_check.SpfChecker:
    checker = spf_check.SpfChecker(
        SpfConfig(enabled=True, timeout=spf_timeout),
        DnsConfig(nameservers=["127.0.0.1"], timeout=dns_timeout),
        receiver="mx.example.org",
        timer=timer,
        **kwargs,
    )
    resolver.lifetime = dns_timeout
    checker.resolver = resolver  # type: ignore[assignment]  # duck-typed: resolve() and lifetime
    return checker


@pytest.mark.parametrize("dns_timeout", [2.0, 4.0, 8.0])
async def test_exp_lookup_timing_out_at_the_end_of_the_budget_still_fails(
    dns_timeout: float,
) -> None:
    # RFC 7208 test suite, exp-dns-error: a timed-out exp= lookup is ignored, the result is
    # fail. The lookup is the last one and times out just as spf.timeout (4 s) runs out;
    # whatever the dns.timeout, its own error must decide, not the overall limit.
    loop = asyncio.get_running_loop()
    budget = 4.0
    timers: list[tuple[float, asyncio.Timeout]] = []
    checking: asyncio.Future[SpfResult] | None = None
    finished = threading.Event()

    def timer(seconds: float) -> asyncio.Timeout:
        timeout = asyncio.timeout(None)  # expires only when the test says time has come
        timers.append((seconds, timeout))
        return timeout

    def time_runs_out(_name: str, lifetime: float) -> None:
        # The lookup waits its whole lifetime (the test's clock: the real one has moved a few
        # milliseconds). Every timer due by then expires; the lookup's own timeout is raised
        # once the event loop has acted on them (a bounded wait).
        assert lifetime <= budget
        for _ in range(500):  # the checker sets its timer just after handing the job over
            if timers:
                break
            time.sleep(0.01)
        due = [timeout for seconds, timeout in timers if seconds <= lifetime + 0.1]
        for timeout in due:
            loop.call_soon_threadsafe(timeout.reschedule, loop.time())
        if due:
            finished.wait(5)

    resolver = FakeResolver(
        {("e21.example.com", "TXT"): ['"v=spf1 exp=e21msg.example.com -all"']},
        silent=lambda name: name.startswith("e21msg."),
        on_silent=time_runs_out,
    )
    checker = _checker(resolver, spf_timeout=budget, dns_timeout=dns_timeout, timer=timer)
    try:
        checking = asyncio.ensure_future(checker.check("1.2.3.4", "foo@e21.example.com", "h"))
        checking.add_done_callback(lambda _f: finished.set())
        result = await asyncio.wait_for(checking, 10)
    finally:
        checker.close()
    assert result.result == "fail"
    assert [name for name, _ in resolver.lifetimes] == ["e21.example.com", "e21msg.example.com"]


def test_default_overall_spf_limit_is_rfc7208s_20_seconds() -> None:
    # RFC 7208 section 4.6.4: "MAY impose a limit ... SHOULD allow at least 20 seconds".
    assert SpfConfig().timeout == 20.0


async def test_senders_whose_dns_never_answers_do_not_starve_other_senders() -> None:
    # 48 senders of one domain whose nameservers never answer (issue 14: they filled the 16
    # workers), then a sender whose DNS answers at once: it must get its own result.
    release = threading.Event()
    resolver = FakeResolver(
        {("good.example.org", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"']},
        silent=lambda name: name.endswith("slow.example.net"),
        on_silent=lambda _name, _lifetime: release.wait(10),  # a bound: the test releases
    )
    checker = _checker(resolver, spf_timeout=20, dns_timeout=2)
    slow = [
        asyncio.ensure_future(checker.check(f"198.51.100.{n}", f"u{n}@slow.example.net", "h"))
        for n in range(1, 49)
    ]
    try:
        good = await asyncio.wait_for(checker.check("192.0.2.1", "a@good.example.org", "h"), 10)
    finally:
        release.set()
        slow_results = await asyncio.wait_for(asyncio.gather(*slow), 15)
        checker.close()
    assert good.result == "pass"
    assert {r.result for r in slow_results} == {"temperror"}


async def test_many_slow_domains_do_not_starve_other_senders() -> None:
    # The same with 48 different slow domains: no fixed pool of 16 threads to fill.
    release = threading.Event()
    resolver = FakeResolver(
        {("good.example.org", "TXT"): ['"v=spf1 ip4:192.0.2.1 -all"']},
        silent=lambda name: name.endswith(".slow.example.net"),
        on_silent=lambda _name, _lifetime: release.wait(10),  # a bound: the test releases
    )
    checker = _checker(resolver, spf_timeout=20, dns_timeout=2)
    slow = [
        asyncio.ensure_future(checker.check("198.51.100.7", f"u@d{n}.slow.example.net", "h"))
        for n in range(1, 49)
    ]
    try:
        good = await asyncio.wait_for(checker.check("192.0.2.1", "a@good.example.org", "h"), 10)
    finally:
        release.set()
        slow_results = await asyncio.wait_for(asyncio.gather(*slow), 15)
        checker.close()
    assert good.result == "pass"
    assert {r.result for r in slow_results} == {"temperror"}


@pytest.mark.parametrize(
    "domain",
    [
        "\u2603.example.org",  # a symbol IDNA 2008 does not allow
        "\u00e4\u200d.example.org",  # a joiner without its context
        "\u0640.example.org",  # a lone Arabic tatweel
        "exa..mple.org",  # an empty label
        "a" * 64 + ".example.org",  # a label over 63 octets
        "localhost",  # not a multi-label name
    ],
)
async def test_malformed_sender_domain_is_none(domain: str) -> None:
    # RFC 7208 section 4.3: a malformed <domain> makes check_host() return "none" at once.
    resolver = FakeResolver({}, silent=lambda _name: True)
    checker = _checker(resolver, spf_timeout=20, dns_timeout=2)
    try:
        result = await checker.check("192.0.2.1", f"a@{domain}", "h.example.org")
    finally:
        checker.close()
    assert result.result == "none"
    assert result.received_spf.startswith("Received-SPF: none (")
    assert resolver.lifetimes == []  # nothing was asked


def _key_values(header: str) -> dict[str, str]:
    """The key=value pairs after the comment, values unquoted (RFC 7208 section 9.1)."""
    rest = header.split(") ", 1)[1] if ") " in header else header.split(" ", 2)[2]
    pairs: dict[str, str] = {}
    for match in re.finditer(r'([a-z-]+)=("(?:[^"\\]|\\.)*"|[^;\s]+)(?:;\s*|$)', rest):
        value = match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs[match.group(1)] = value
    return pairs


# The longest valid inputs: a 254-octet mailbox (RFC 5321 4.5.3.1.3), 253-octet host names
# (RFC 1035), the longest IPv6 text, a mechanism naming a 253-octet domain.
LONG_DOMAIN = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
LONG_MAILBOX = "l" * 64 + "@" + ".".join(["a" * 63, "b" * 63, "c" * 61])
LONG_IPV6 = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"


@pytest.mark.parametrize(
    ("result", "problem", "mechanism"),
    [
        ("pass", "", "include:" + LONG_DOMAIN),
        ("fail", "", "-all"),
        ("permerror", "Unknown mechanism found: " + "x" * 200, ""),
        ("temperror", "DNS lookup failed", ""),
        ("none", "", ""),
    ],
)
def test_longest_valid_inputs_give_a_whole_header_within_the_line_limit(
    result: str, problem: str, mechanism: str
) -> None:
    assert (len(LONG_DOMAIN), len(LONG_MAILBOX)) == (253, 254)
    header = received_spf_header(
        result,
        client_ip=LONG_IPV6,
        envelope_from=LONG_MAILBOX,
        helo=LONG_DOMAIN,
        receiver=LONG_DOMAIN,
        problem=problem,
        mechanism=mechanism,
    )
    # policyd answers PREPEND on one line and cuts it at this length.
    assert len(header) <= MAX_HEADER_LENGTH
    assert header.startswith(f"Received-SPF: {result} ")
    pairs = _key_values(header)
    assert pairs["client-ip"] == LONG_IPV6
    assert pairs["envelope-from"] == LONG_MAILBOX
    assert pairs["helo"] == LONG_DOMAIN
    assert pairs["receiver"] == LONG_DOMAIN
    assert pairs["identity"] == "mailfrom"
    assert header.endswith("; identity=mailfrom")
    # What had to give way is left out whole, never cut.
    assert pairs.get("mechanism") in (None, mechanism or None)
    assert pairs.get("problem") in (None, problem or None)


def test_a_long_mechanism_is_kept_whole_beside_long_names() -> None:
    mechanism = "include:" + LONG_DOMAIN
    header = received_spf_header(
        "pass",
        client_ip="192.0.2.1",
        envelope_from="x@" + LONG_DOMAIN,
        helo=LONG_DOMAIN,
        receiver="mx.example.org",
        mechanism=mechanism,
    )
    assert len(header) <= MAX_HEADER_LENGTH
    assert _key_values(header)["mechanism"] == mechanism


def test_a_short_header_keeps_its_comment() -> None:
    header = received_spf_header(
        "pass", client_ip="192.0.2.1", envelope_from="a@b.test", helo="h.test", receiver="mx"
    )
    assert "(mx: domain of b.test designates 192.0.2.1 as permitted sender)" in header


def test_hostile_inputs_still_give_a_header_within_the_line_limit() -> None:
    quotes = '"' * 255
    header = received_spf_header(
        "fail",
        client_ip=LONG_IPV6,
        envelope_from=quotes + "@" + quotes,
        helo=quotes,
        receiver=LONG_DOMAIN,
        mechanism=quotes,
    )
    assert len(header) <= MAX_HEADER_LENGTH
    assert header.endswith("; identity=mailfrom")
    assert _key_values(header)["client-ip"] == LONG_IPV6


async def test_temperror_header_names_no_internal_server_or_library(
    caplog: pytest.LogCaptureFixture,
) -> None:
    resolver = FakeResolver({}, silent=lambda _name: True)
    checker = _checker(resolver, spf_timeout=20, dns_timeout=2)
    try:
        with caplog.at_level(logging.INFO, logger="postwarden.spf"):
            result = await checker.check("192.0.2.1", "a@example.org", "h.example.org")
    finally:
        checker.close()
    assert result.result == "temperror"
    for shown in (result.received_spf, result.explanation):
        assert "10.53.0.1" not in shown
        assert "Do53" not in shown
        assert "Timeout" not in shown
        assert "dns" not in shown.replace("DNS lookup failed", "").lower()
    assert 'problem="DNS lookup failed"' in result.received_spf
    # The detail is in postwarden's own log line.
    assert any("10.53.0.1" in r.getMessage() for r in caplog.records)
