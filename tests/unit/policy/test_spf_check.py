"""The Received-SPF header (RFC 7208 section 9.1), the SPF verdict and the checker, without DNS."""

from __future__ import annotations

import asyncio
import threading

import pytest

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
    assert seconds == 4  # spf.timeout
    timeout.reschedule(asyncio.get_running_loop().time())  # the budget runs out now
    result = await asyncio.wait_for(checking, 5)
    release.set()
    checker.close()
    assert result.result == "temperror"
    assert result.received_spf.startswith("Received-SPF: temperror")
    assert 'problem="no result within 4.0s"' in result.received_spf
