"""Prometheus metrics of the policy server, served on a loopback HTTP port.

With several worker processes the counters are aggregated across them with
prometheus_client's multiprocess mode: the supervisor sets PROMETHEUS_MULTIPROC_DIR
before any worker imports prometheus_client (the library picks its value store at import
time), and one dedicated process serves the sum of every worker's files. With one worker
the ordinary in-process registry is served from a thread.

prometheus_client is imported inside functions on purpose: importing it before the
multiprocess directory is chosen would silently give per-process numbers.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from postwarden.syntax.endpoints import parse_ip_port

if TYPE_CHECKING:
    from postwarden.policy.verdict import Verdict

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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


def parse_metrics_listen(value: str) -> tuple[str, int]:
    """`127.0.0.1:9641` or `[::1]:9641` as (host, port); the config validator checks loopback.

    The same parser `policyd.metrics_listen` is validated with, so a checked value binds.
    """
    return parse_ip_port(value)


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


def serve_in_thread(listen: str) -> None:
    """Serve this process's registry on `listen` from a daemon thread (one-worker mode)."""
    from prometheus_client import start_http_server

    host, port = parse_metrics_listen(listen)
    start_http_server(port, addr=host)


def serve_multiprocess_forever(listen: str) -> None:
    """Serve the sum over every worker's metric files; blocks (run in its own process)."""
    from wsgiref.simple_server import make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.exposition import (
        ThreadingWSGIServer,
        _SilentHandler,
    )
    from prometheus_client.multiprocess import MultiProcessCollector

    class V6Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
    host, port = parse_metrics_listen(listen)
    server_class = V6Server if ":" in host else ThreadingWSGIServer
    httpd = make_server(host, port, make_wsgi_app(registry), server_class, _SilentHandler)
    httpd.serve_forever()


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live-only files (multiprocess mode)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped upstream
