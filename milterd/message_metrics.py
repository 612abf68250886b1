"""What milterd counts for Prometheus; postwarden.daemon.metrics_http serves it.

Every listener process records into prometheus_client's multiprocess directory, which the
supervisor chose before forking; the supervisor serves the sum. `create_metrics` imports
prometheus_client inside the function so that nothing imports it before that choice.

- `postwarden_milter_messages_total{rule, dkim}`: messages decided, by `MessageRule` and
  the message's DKIM result (`message_result`), the `rule=` and `dkim=` of its log line;
- `postwarden_milter_errors_total{kind}`: messages answered per `milterd.on_error` instead:
  `fault` (the message cannot be handled as configured: a broken key, a DNS temperror
  with on_error = tempfail, a malformed field name) or `internal` (a bug);
- `postwarden_milter_message_seconds`: the time each decided message took (its `ms=`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from milterd.message_handler import Changes

# Signing takes a millisecond or two; verifying waits on DNS, up to dns.timeout per signature.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Every `Changes.dkim` value a message can have (one per signature, for inbound mail).
DKIM_RESULTS = frozenset(
    {
        "signed",
        "unsigned",
        "rejected",
        "unverified",
        "pass",
        "fail",
        "none",
        "temperror",
        "permerror",
        "neutral",
        "policy",
    }
)
ERROR_KINDS = ("fault", "internal")


def message_result(dkim: str) -> str:
    """One bounded label value for a message's `dkim=`: with several signatures (`fail/pass`),
    `pass` when any passed (a receiver trusts the message for that domain), else the first.
    """
    results = dkim.split("/")
    result = "pass" if "pass" in results else results[0]
    return result if result in DKIM_RESULTS else "other"


class NullMetrics:
    """What the milter calls when metrics are off: nothing."""

    def message(self, changes: Changes, seconds: float) -> None:
        return None

    def error(self, kind: str) -> None:
        return None


@dataclass
class Metrics:
    """milterd's counters; label children are cached (libmilter's threads share them)."""

    messages: Any
    latency: Any
    errors: Any
    _children: dict[tuple[str, str], Any] = field(default_factory=dict)

    def message(self, changes: Changes, seconds: float) -> None:
        key = (changes.rule.value, message_result(changes.dkim))
        child = self._children.get(key)
        if child is None:
            # A race between two threads only looks the same child up twice.
            child = self.messages.labels(rule=key[0], dkim=key[1])
            self._children[key] = child
        child.inc()
        self.latency.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Register the metrics (in the default registry unless `registry` is given)."""
    from prometheus_client import REGISTRY, Counter, Histogram

    target = REGISTRY if registry is None else registry
    metrics = Metrics(
        messages=Counter(
            "postwarden_milter_messages",
            "Messages signed, left unsigned, rejected or verified, by rule and DKIM result.",
            ["rule", "dkim"],
            registry=target,
        ),
        latency=Histogram(
            "postwarden_milter_message_seconds",
            "Time milterd spent deciding a message (the ms= of its log line).",
            buckets=LATENCY_BUCKETS,
            registry=target,
        ),
        errors=Counter(
            "postwarden_milter_errors",
            "Messages answered per milterd.on_error instead of decided, by kind.",
            ["kind"],
            registry=target,
        ),
    )
    for kind in ERROR_KINDS:
        metrics.errors.labels(kind=kind)  # shown at 0 from the start, so rate() sees the first
    return metrics
