"""The filtering order around the pure engine: an in-memory store and fake DNS checkers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from postwarden.config import Config
from postwarden.policy.dnsbl import DnsblResult
from postwarden.policy.list_entries import CompiledLists, parse_entry
from postwarden.policy.live_lists import LiveLists
from postwarden.policy.pipeline import FailureLog, Pipeline
from postwarden.policy.records import (
    ListEntry,
    ListName,
)
from postwarden.policy.request import PolicyRequest
from postwarden.policy.spf_check import SpfResult
from postwarden.policy.verdict import Action, Rule, Verdict, dunno, prepend
from tests.unit.policy.fake_store import FakeStore

CLIENT = "192.0.2.10"
SPF_HEADER = "Received-SPF: pass (example.org: 192.0.2.10 is permitted) client-ip=192.0.2.10"
NOT_LISTED = DnsblResult()
LISTED = DnsblResult(score=1, listed=(("dnsbl.test", "127.0.0.2"),))
SPF_NONE = SpfResult("none", "no SPF record", "Received-SPF: none (no record) client-ip=192.0.2.10")
SPF_PASS = SpfResult("pass", "sender SPF authorized", SPF_HEADER)
SPF_FAIL = SpfResult("fail", "SPF fail - not authorized", "Received-SPF: fail x")


class FakeChecker:
    """A DNSBL or SPF checker whose answer is set by the test; it can be made to hang."""

    def __init__(self, name: str, calls: list[str], answer: object) -> None:
        self.name = name
        self.calls = calls
        self.answer = answer
        self.hang = False  # wait until the request timeout cancels the check
        self.entered = asyncio.Event()
        self.error: Exception | None = None

    async def check(self, *args: str) -> Any:
        self.calls.append(self.name)
        self.entered.set()
        if self.hang:
            await asyncio.Event().wait()  # never set: only a cancellation ends this
        if self.error is not None:
            raise self.error
        return self.answer


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_config(**sections: Any) -> Config:
    data: dict[str, Any] = {"greylisting": {"enabled": True, "delay": 300}}
    data.update(sections)
    return Config.model_validate(data)


def rcpt(**attrs: str) -> PolicyRequest:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": CLIENT,
        "client_name": "mail.example.org",
        "sender": "alice@example.org",
        "recipient": "bob@example.com",
        "instance": "a1.b2.c3",
        "queue_id": "ABC123",
        "helo_name": "mail.example.org",
    }
    base.update(attrs)
    return PolicyRequest(base)


class Rig:
    """A pipeline wired to fakes, recording the order in which checks ran."""

    def __init__(self, cfg: Config, entries: Sequence[tuple[ListName, str]] = ()) -> None:
        self.calls: list[str] = []
        self.store = FakeStore()
        self.clock = Clock()
        self.dnsbl = FakeChecker("dnsbl", self.calls, NOT_LISTED)
        self.spf = FakeChecker("spf", self.calls, SPF_NONE)
        self.timers: list[tuple[float, asyncio.Timeout]] = []
        lists = CompiledLists.from_entries(ListEntry(n, parse_entry(e)) for n, e in entries)
        self.pipeline = Pipeline(
            cfg,
            self.store,
            LiveLists(lists, 0),
            self.dnsbl,
            self.spf,
            None,
            self.clock,
            request_timer=self.timer,
        )

    def timer(self, seconds: float) -> asyncio.Timeout:
        """The request timeout, never expiring by itself: the test expires it."""
        timeout = asyncio.timeout(None)
        self.timers.append((seconds, timeout))
        return timeout

    async def evaluate(self, request: PolicyRequest) -> Verdict:
        return await self.pipeline.evaluate(request)


ALL_ON = {
    "dnsbl": {"enabled": True, "zones": [{"zone": "dnsbl.test"}]},
    "spf": {"enabled": True},
}


async def test_only_rcpt_stage_is_judged() -> None:
    rig = Rig(make_config(**ALL_ON))
    for state in ("CONNECT", "EHLO", "MAIL", "DATA", "END-OF-MESSAGE"):
        verdict = await rig.evaluate(rcpt(protocol_state=state))
        assert verdict == dunno(Rule.NOT_APPLICABLE)
    assert rig.calls == [] and rig.store.calls == []


@pytest.mark.parametrize(
    "attrs",
    [{"sasl_username": "alice"}, {"client_address": "127.0.0.1"}, {"client_address": "::1"}],
)
async def test_sasl_and_trusted_networks_skip_every_check(attrs: dict[str, str]) -> None:
    rig = Rig(make_config(**ALL_ON), [(ListName.FORBIDDEN, "example.org")])
    assert await rig.evaluate(rcpt(**attrs)) == dunno(Rule.TRUSTED)
    assert rig.calls == [] and rig.store.calls == []


async def test_forbidden_ip_rejects_before_spam_checks() -> None:
    rig = Rig(make_config(**ALL_ON), [(ListName.FORBIDDEN, "192.0.2.0/24")])
    verdict = await rig.evaluate(rcpt())
    assert verdict.action is Action.REJECT and verdict.rule is Rule.IP_FORBIDDEN
    assert rig.calls == [] and rig.store.calls == []


async def test_permitted_mailbox_passes_without_spam_checks() -> None:
    rig = Rig(make_config(**ALL_ON), [(ListName.PERMITTED, "Alice@Example.org")])
    assert await rig.evaluate(rcpt()) == dunno(Rule.MAILBOX_PERMITTED)
    assert rig.calls == [] and rig.store.calls == []


async def test_checks_run_in_order_dnsbl_spf_greylist() -> None:
    rig = Rig(make_config(**ALL_ON))
    verdict = await rig.evaluate(rcpt())
    assert rig.calls == ["dnsbl", "spf"]
    assert rig.store.calls == ["greylist_lookup", "greylist_update"]
    assert verdict.action is Action.DEFER_IF_PERMIT and verdict.rule is Rule.GREYLIST_DEFER


async def test_dnsbl_listing_stops_spf_and_greylisting() -> None:
    rig = Rig(make_config(**ALL_ON))
    rig.dnsbl.answer = LISTED
    verdict = await rig.evaluate(rcpt())
    assert verdict.rule is Rule.DNSBL
    assert rig.calls == ["dnsbl"] and rig.store.calls == []


async def test_spf_fail_rejects_before_greylisting() -> None:
    rig = Rig(make_config(**ALL_ON))
    rig.spf.answer = SPF_FAIL
    verdict = await rig.evaluate(rcpt())
    assert verdict.rule is Rule.SPF_FAIL and verdict.action is Action.REJECT
    assert rig.calls == ["dnsbl", "spf"] and rig.store.calls == []


async def test_disabled_checks_are_not_called() -> None:
    rig = Rig(make_config(greylisting={"enabled": False}))
    assert await rig.evaluate(rcpt()) == dunno(Rule.NO_CHECKS)
    assert rig.calls == [] and rig.store.calls == []


async def test_greylist_defers_then_passes_with_header_after_the_delay() -> None:
    rig = Rig(make_config())
    assert (await rig.evaluate(rcpt())).rule is Rule.GREYLIST_DEFER
    rig.clock.now += 301
    passed = await rig.evaluate(rcpt())
    assert passed.action is Action.PREPEND and passed.rule is Rule.GREYLIST_PASS
    assert passed.text.startswith("X-Greylist: delayed 301 seconds")
    rig.clock.now += 10
    assert await rig.evaluate(rcpt(instance="next.message")) == dunno(Rule.GREYLIST_KNOWN)


async def test_received_spf_wins_over_x_greylist_then_next_recipient_gets_the_other() -> None:
    rig = Rig(make_config(**ALL_ON))
    rig.spf.answer = SPF_PASS
    # Defer both recipients once, then let the delay pass.
    await rig.evaluate(rcpt(recipient="one@example.com"))
    await rig.evaluate(rcpt(recipient="two@example.com"))
    await rig.evaluate(rcpt(recipient="three@example.com"))
    rig.clock.now += 400
    first = await rig.evaluate(rcpt(recipient="one@example.com"))
    assert first.action is Action.PREPEND and first.text == SPF_HEADER
    assert first.rule is Rule.GREYLIST_PASS
    second = await rig.evaluate(rcpt(recipient="two@example.com"))
    assert second.action is Action.PREPEND and second.text.startswith("X-Greylist:")
    # Both headers already went into this message: the third recipient adds nothing.
    third = await rig.evaluate(rcpt(recipient="three@example.com"))
    assert third == dunno(Rule.GREYLIST_PASS)


async def test_spf_header_is_not_repeated_for_each_recipient_of_one_message() -> None:
    rig = Rig(make_config(greylisting={"enabled": False}, spf={"enabled": True}))
    rig.spf.answer = SPF_PASS
    first = await rig.evaluate(rcpt(recipient="one@example.com"))
    second = await rig.evaluate(rcpt(recipient="two@example.com"))
    other_message = await rig.evaluate(rcpt(recipient="two@example.com", instance="other"))
    assert first == prepend(Rule.SPF, SPF_HEADER)
    assert second == dunno(Rule.SPF)
    assert other_message == prepend(Rule.SPF, SPF_HEADER)


async def test_store_error_answers_the_default_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(make_config())
    rig.store.failing = True
    with caplog.at_level(logging.ERROR, logger="postwarden.policy.pipeline"):
        for _ in range(5):
            assert await rig.evaluate(rcpt()) == dunno(Rule.DEFAULT)
    lines = [r for r in caplog.records if "store failure" in r.getMessage()]
    assert len(lines) == 1
    assert not lines[0].exc_info  # an expected failure: no traceback


async def test_a_failed_greylist_write_answers_the_default() -> None:
    rig = Rig(make_config(spf={"enabled": True}))
    rig.spf.answer = SPF_PASS
    rig.store.failing_calls = {"greylist_update"}
    kinds: list[str] = []
    rig.pipeline.on_failure = kinds.append
    assert await rig.evaluate(rcpt()) == dunno(Rule.DEFAULT)
    assert kinds == ["store"]
    rig.store.failing_calls = set()
    rig.clock.now += 400
    # The deferral was not stored: the retry is a new triplet again, deferred again.
    assert (await rig.evaluate(rcpt())).rule is Rule.GREYLIST_DEFER


async def test_each_failure_kind_is_logged_again_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(make_config())
    monotonic = Clock()
    rig.pipeline.failures = FailureLog(interval=60.0, clock=monotonic)
    rig.store.failing = True
    with caplog.at_level(logging.ERROR, logger="postwarden.policy.pipeline"):
        await rig.evaluate(rcpt())
        monotonic.now += 59
        await rig.evaluate(rcpt())
        monotonic.now += 1
        await rig.evaluate(rcpt())
    lines = [r.getMessage() for r in caplog.records if "store failure" in r.getMessage()]
    assert len(lines) == 2
    assert lines[1].endswith("(1 more since last logged)")


async def test_default_action_comes_from_the_config() -> None:
    rig = Rig(make_config(policyd={"default_action": "DEFER_IF_PERMIT"}))
    rig.store.failing = True
    verdict = await rig.evaluate(rcpt())
    assert verdict.action is Action.DEFER_IF_PERMIT and verdict.rule is Rule.DEFAULT


async def test_slow_check_hits_request_timeout_and_answers_default() -> None:
    rig = Rig(make_config(policyd={"request_timeout": 8.0}, **ALL_ON))
    rig.dnsbl.hang = True
    kinds: list[str] = []
    rig.pipeline.on_failure = kinds.append
    judged = asyncio.create_task(rig.evaluate(rcpt()))
    await asyncio.wait_for(rig.dnsbl.entered.wait(), 5)  # a bound, never reached
    [(seconds, timeout)] = rig.timers
    assert seconds == 8.0  # the configured policyd.request_timeout
    timeout.reschedule(asyncio.get_running_loop().time())  # the deadline passes now
    assert await asyncio.wait_for(judged, 5) == dunno(Rule.DEFAULT)
    assert kinds == ["timeout"]
    assert rig.calls == ["dnsbl"] and rig.store.calls == []


async def test_unexpected_exception_answers_default_with_one_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(make_config(**ALL_ON))
    rig.spf.error = ZeroDivisionError("bug")
    with caplog.at_level(logging.ERROR, logger="postwarden.policy.pipeline"):
        assert await rig.evaluate(rcpt()) == dunno(Rule.DEFAULT)
        assert await rig.evaluate(rcpt()) == dunno(Rule.DEFAULT)
    lines = [r for r in caplog.records if "unexpected failure" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is not None


async def test_failure_hook_counts_every_failure() -> None:
    rig = Rig(make_config())
    kinds: list[str] = []
    rig.pipeline.on_failure = kinds.append
    rig.store.failing = True
    for _ in range(3):
        await rig.evaluate(rcpt())
    assert kinds == ["store", "store", "store"]


async def test_unparseable_client_address_skips_greylisting() -> None:
    rig = Rig(make_config())
    assert await rig.evaluate(rcpt(client_address="unknown")) == dunno(Rule.NO_CHECKS)


# --- live lists -------------------------------------------------------------------------


# --- the real DNSBL/SPF verdict functions, wired by default ------------------------------


async def test_default_wiring_uses_dnsbl_and_spf_verdict_functions() -> None:
    cfg = make_config(**ALL_ON)
    calls: list[str] = []
    dnsbl_fake = FakeChecker("dnsbl", calls, NOT_LISTED)
    spf_fake = FakeChecker("spf", calls, SPF_NONE)
    pipeline = Pipeline(
        cfg,
        FakeStore(),
        LiveLists(CompiledLists.from_entries(()), 0),
        dnsbl_fake,
        spf_fake,
        None,
        Clock(),
    )
    dnsbl_fake.answer = DnsblResult(score=1, listed=(("dnsbl.test", "127.0.0.2"),))
    listed = await pipeline.evaluate(rcpt())
    assert listed.action is Action.REJECT and listed.rule is Rule.DNSBL
    assert "dnsbl.test" in listed.text

    dnsbl_fake.answer = DnsblResult()
    spf_fake.answer = SpfResult("fail", "not permitted", "Received-SPF: fail x")
    failed = await pipeline.evaluate(rcpt())
    assert failed.action is Action.REJECT and failed.rule is Rule.SPF_FAIL

    spf_fake.answer = SpfResult("pass", "ok", SPF_HEADER)
    passed = await pipeline.evaluate(rcpt(recipient="new@example.com"))
    # SPF passed, greylisting deferred the new triplet: the deferral wins over the header.
    assert passed.action is Action.DEFER_IF_PERMIT


def test_a_request_timeout_shorter_than_the_dns_checks_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="postwarden.policy.pipeline"):
        Rig(make_config(**ALL_ON))  # defaults: 30 s for 2 s DNSBL + 20 s SPF
        assert not caplog.records
        Rig(make_config(**ALL_ON, policyd={"request_timeout": 6.0}))
    [record] = caplog.records
    assert "request_timeout (6s)" in record.getMessage()
    assert "(22s)" in record.getMessage()
