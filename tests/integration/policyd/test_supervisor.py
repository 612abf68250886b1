"""The pre-fork supervisor: workers share the sockets, die and come back, stop together."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import pytest

from tests.fixtures.policyd_daemon import (
    StartPolicyd,
)
from tests.integration.policyd.policy_client import (
    DEFER,
    DUNNO,
    ask_once,
    request,
)


async def test_workers_share_the_sockets_and_stop_together(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon({"policyd": {"workers": 2}})

    async def client(n: int) -> bytes:
        return await ask_once(daemon, request(recipient=f"w{n}@example.com"))

    replies = await asyncio.gather(*(client(n) for n in range(40)))
    assert set(replies) == {DEFER}
    daemon.wait_for_log("policyd: 4Bf3")  # decision lines are written in batches
    pids = set(re.findall(r"postwarden\.policyd\[(\d+)\]: policyd: 4Bf3", daemon.logs()))
    assert len(pids) >= 1
    assert await asyncio.to_thread(daemon.stop) == 0, daemon.logs()


@pytest.mark.expect_log(r"worker \d+ exited \(-9\), restarting it")
async def test_supervisor_restarts_a_dead_worker_and_forwards_sighup(
    policyd_daemon: StartPolicyd,
) -> None:
    daemon = policyd_daemon({"policyd": {"workers": 2}})
    deadline = time.monotonic() + 10
    while len(workers := re.findall(r"policyd\[(\d+)\]: policyd: listening", daemon.logs())) < 2:
        assert time.monotonic() < deadline, daemon.logs()
        await asyncio.sleep(0.05)
    os.kill(int(workers[0]), signal.SIGKILL)
    daemon.wait_for_log("restarting it")
    deadline = time.monotonic() + 10
    while len(re.findall(r"policyd: listening on", daemon.logs())) < 3:
        assert time.monotonic() < deadline, daemon.logs()
        await asyncio.sleep(0.05)
    replies = await asyncio.gather(
        *(ask_once(daemon, request(recipient=f"k{n}@x.org")) for n in range(20))
    )
    assert set(replies) == {DEFER}

    daemon.rewrite_config({"greylisting": {"enabled": False}})
    daemon.send_signal(signal.SIGHUP)
    while daemon.logs().count("config reloaded") < 2:
        assert time.monotonic() < deadline + 5, daemon.logs()
        await asyncio.sleep(0.05)
    replies = await asyncio.gather(
        *(ask_once(daemon, request(recipient=f"h{n}@x.org")) for n in range(20))
    )
    assert set(replies) == {DUNNO}
