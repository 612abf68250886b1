"""What the policy server counts for Prometheus; postwarden.daemon.metrics_http serves it.

With several worker processes the counters are aggregated across them (the supervisor
chooses the multiprocess directory before any worker imports prometheus_client); with one
worker the ordinary in-process registry is served from a thread. `create_metrics` imports
prometheus_client inside the function for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# policyd's name for it since before the serving moved to postwarden.daemon.
from postwarden.daemon.metrics_http import parse_metrics_listen as parse_metrics_listen

if TYPE_CHECKING:
    from postwarden.policy.verdict import Verdict

# Latency buckets around the 1 ms target: most answers are sub-millisecond; DNS is slower.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
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
)


class NullMetrics:
    """What the server calls when metrics are off: nothing."""

    def decision(self, verdict: Verdict, seconds: float) -> None:
        return None

    def error(self, kind: str) -> None:
        return None


@dataclass
class Metrics:
    """The server's counters; label children are cached so a decision costs two lookups."""

    decisions: Any
    latency: Any
    errors: Any
    _children: dict[tuple[str, str], Any] = field(default_factory=dict)

    def decision(self, verdict: Verdict, seconds: float) -> None:
        key = (verdict.action.value, verdict.rule.value)
        child = self._children.get(key)
        if child is None:
            child = self.decisions.labels(verdict=key[0], rule=key[1])
            self._children[key] = child
        child.inc()
        self.latency.observe(seconds)

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()


def create_metrics() -> Metrics:
    """Register the metrics (in multiprocess mode when the supervisor chose a directory)."""
    from prometheus_client import Counter, Histogram

    return Metrics(
        decisions=Counter(
            "postwarden_policy_decisions",
            "Policy decisions, by Postfix action and the rule that fired.",
            ["verdict", "rule"],
        ),
        latency=Histogram(
            "postwarden_policy_request_seconds",
            "Time from a complete request to its verdict.",
            buckets=LATENCY_BUCKETS,
        ),
        errors=Counter(
            "postwarden_policy_errors",
            "Failures answered with the default action or a protocol error, by kind.",
            ["kind"],
        ),
    )
