"""Prometheus metrics of the real policyd, aggregated across worker processes."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from tests.fixtures.policyd_daemon import (
    StartPolicyd,
    free_tcp_port,
)
from tests.integration.policyd.policy_client import (
    DEFER,
    ask_once,
    request,
)


def _scrape(port: int) -> str:
    # The metrics server comes up beside the workers: give it a moment (bounded).
    deadline = time.monotonic() + 10
    while True:
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("workers", [1, 2])
async def test_metrics_count_decisions_across_workers(
    policyd_daemon: StartPolicyd, workers: int
) -> None:
    port = free_tcp_port()
    daemon = policyd_daemon(
        {"policyd": {"metrics_listen": f"127.0.0.1:{port}", "workers": workers}}
    )
    for i in range(12):
        assert await ask_once(daemon, request(recipient=f"m{i}@example.com")) == DEFER
    await ask_once(daemon, b"junk\n\n")
    text = await asyncio.to_thread(_scrape, port)
    decisions = "postwarden_policy_decisions_total"
    assert _sample(text, decisions, verdict="DEFER_IF_PERMIT", rule="greylist_defer") == 12
    assert _sample(text, decisions, verdict="DUNNO", rule="bad_request") == 1
    assert _sample(text, "postwarden_policy_request_seconds_count") >= 12
    assert _sample(text, "postwarden_policy_errors_total", kind="protocol_MalformedLine") == 1
