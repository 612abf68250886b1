"""milterd's Prometheus counters: what one message adds, through the milter's end of message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from milterd.message_handler import Changes, Envelope, MessageFault, MessageRule
from milterd.message_metrics import NullMetrics, create_metrics, message_result
from milterd.milter import ACCEPT, TEMPFAIL, DkimMilter
from postwarden.config import parse_config

MESSAGES = "postwarden_milter_messages_total"


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("dkim", "label"),
    [
        ("signed", "signed"),
        ("rejected", "rejected"),
        ("none", "none"),
        ("fail", "fail"),
        ("fail/pass", "pass"),  # any signature that verifies makes the message pass
        ("temperror/fail", "temperror"),
        ("policy/policy/policy", "policy"),
        ("something new", "other"),  # never an unbounded label value
    ],
)
def test_a_message_result_is_one_bounded_label(dkim: str, label: str) -> None:
    assert message_result(dkim) == label


def test_each_message_counts_once_by_rule_and_result_with_its_time() -> None:
    registry = CollectorRegistry()
    metrics = create_metrics(registry)
    metrics.message(Changes(rule=MessageRule.SIGN, dkim="signed"), 0.002)
    metrics.message(Changes(rule=MessageRule.SIGN, dkim="signed"), 0.003)
    metrics.message(Changes(rule=MessageRule.VERIFY, dkim="fail/pass"), 0.5)
    metrics.message(Changes(rule=MessageRule.FROM_MISMATCH, dkim="rejected"), 0.0001)
    assert _count(registry, MESSAGES, rule="sign", dkim="signed") == 2
    assert _count(registry, MESSAGES, rule="verify", dkim="pass") == 1
    assert _count(registry, MESSAGES, rule="from_mismatch", dkim="rejected") == 1
    assert _count(registry, MESSAGES, rule="verify", dkim="fail") == 0
    assert _count(registry, "postwarden_milter_message_seconds_count") == 4
    assert _count(registry, "postwarden_milter_message_seconds_sum") == pytest.approx(0.5051)
    assert _count(registry, "postwarden_milter_message_seconds_bucket", le="0.005") == 3


def test_error_kinds_are_shown_from_the_start_and_counted() -> None:
    registry = CollectorRegistry()
    metrics = create_metrics(registry)
    errors = "postwarden_milter_errors_total"
    assert registry.get_sample_value(errors, {"kind": "fault"}) == 0
    assert registry.get_sample_value(errors, {"kind": "internal"}) == 0
    metrics.error("fault")
    assert _count(registry, errors, kind="fault") == 1
    assert _count(registry, errors, kind="internal") == 0


# -- through the adapter: what eom records ----------------------------------------------------


class _Handler:
    """Stands in for MessageHandler: returns `changes`, or raises `fault`."""

    def __init__(self, changes: Changes | None = None, fault: Exception | None = None) -> None:
        self.config = parse_config({})
        self.changes = changes
        self.fault = fault

    def process(self, envelope: Envelope, headers: object, body: bytes) -> Changes:
        if self.fault is not None:
            raise self.fault
        assert self.changes is not None
        return self.changes

    def forged(self, headers: object) -> list[int]:
        return []


class _Milter(DkimMilter):
    """DkimMilter without libmilter: the context calls answer or record nothing."""

    def getsymval(self, sym: str) -> str | None:
        return {"i": "4QID"}.get(sym)

    def addheader(self, *args: Any) -> None:
        return None

    def chgheader(self, *args: Any) -> None:
        return None

    def setreply(self, *args: Any) -> None:
        return None


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    monkeypatch.setattr(DkimMilter, "metrics", create_metrics(registry))
    yield registry


def _end_of_message(handler: _Handler, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(DkimMilter, "handler", handler, raising=False)  # set only at start
    milter = _Milter()
    milter.mail_from = "a@example.test"
    milter.headers = [(b"From", b"a@example.test")]
    result: int = milter.eom()
    return result


def test_a_decided_message_is_counted_by_the_milter(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    changes = Changes(add=[("DKIM-Signature", "v=1")], rule=MessageRule.SIGN, dkim="signed")
    assert _end_of_message(_Handler(changes), monkeypatch) == ACCEPT
    assert _count(registry, MESSAGES, rule="sign", dkim="signed") == 1
    assert _count(registry, "postwarden_milter_message_seconds_count") == 1
    assert _count(registry, "postwarden_milter_errors_total", kind="fault") == 0


@pytest.mark.parametrize(
    ("fault", "kind"),
    [(MessageFault("cannot sign for x.test"), "fault"), (KeyError("a bug"), "internal")],
)
def test_a_message_answered_per_on_error_is_an_error_not_a_decision(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch, fault: Exception, kind: str
) -> None:
    handler = _Handler(fault=fault)
    handler.config = parse_config({"milterd": {"on_error": "tempfail"}})
    assert _end_of_message(handler, monkeypatch) == TEMPFAIL
    assert _count(registry, "postwarden_milter_errors_total", kind=kind) == 1
    assert _count(registry, "postwarden_milter_message_seconds_count") == 0
    assert all(
        sample.value == 0
        for metric in registry.collect()
        if metric.name == "postwarden_milter_messages"
        for sample in metric.samples
    )


def test_metrics_off_the_milter_records_into_nothing() -> None:
    assert isinstance(DkimMilter.metrics, NullMetrics)
