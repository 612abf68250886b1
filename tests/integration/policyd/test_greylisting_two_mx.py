"""Two MX hosts on one Redis store: two real policyd daemons share their greylist state.

A sender's retry may reach another MX host of the domain than its first attempt (RFC 5321
5.1: it tries the MX list in order, and a deferral often sends it to the next one); the
retry must pass there once the delay has run from the first attempt, with no delay of its
own, and what one host learnt (a passed triplet, an auto-whitelisted network) holds on both.
"""

from __future__ import annotations

import asyncio
import re
import time

from tests.fixtures.policyd_daemon import PolicydHandle, StartPolicyd
from tests.integration.policyd.policy_client import DEFER, DUNNO, ask_once, request

DELAY = 2.0  # seconds: real time passes between the attempts (policyd reads the clock)
WAIT_BOUND = 10.0  # the most a test waits for the delay to run out


def _two_mx(policyd_daemon: StartPolicyd, redis_url: str) -> tuple[PolicydHandle, PolicydHandle]:
    overrides = {
        "store": {"url": redis_url},
        "greylisting": {"delay": DELAY, "auto_whitelist_after": 1, "add_header": True},
    }
    return policyd_daemon(overrides), policyd_daemon(overrides)


async def _until(wall_clock: float) -> None:
    """Sleep until time.time() reaches `wall_clock` (policyd's clock), at most WAIT_BOUND."""
    deadline = time.monotonic() + WAIT_BOUND
    while time.time() < wall_clock and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def test_a_retry_on_the_second_mx_passes_with_no_delay_of_its_own(
    policyd_daemon: StartPolicyd, redis_url: str
) -> None:
    mx_a, mx_b = _two_mx(policyd_daemon, redis_url)
    triplet = {"client_address": "198.51.100.20", "sender": "alice@example.org"}
    before = time.time()
    assert await ask_once(mx_a, request(**triplet, instance="a.1")) == DEFER
    answered = time.time()  # A's first_seen lies between `before` and this
    # An early retry on B, late in A's delay, is deferred (the delay counts from A) ...
    await _until(before + DELAY - 0.5)
    assert await ask_once(mx_b, request(**triplet, instance="b.1")) == DEFER
    # ... and once A's delay has run, B lets the next retry through, although only about
    # 0.6 s have passed since B's own deferral: no delay of B's own started.
    await _until(answered + DELAY + 0.1)
    passed = await ask_once(mx_b, request(**triplet, instance="b.2"))
    header = re.match(rb"action=PREPEND X-Greylist: delayed (\d+) seconds by postwarden; ", passed)
    assert header is not None, passed
    assert int(header.group(1)) >= DELAY  # counted from A's attempt, not B's
    # The triplet that passed on B is known on A.
    assert await ask_once(mx_a, request(**triplet, instance="a.2")) == DUNNO
    mx_b.wait_for_log("rule=greylist_pass")
    mx_a.wait_for_log("rule=greylist_known")


async def test_a_network_whitelisted_on_one_mx_skips_greylisting_on_the_other(
    policyd_daemon: StartPolicyd, redis_url: str
) -> None:
    mx_a, mx_b = _two_mx(policyd_daemon, redis_url)
    first = {"client_address": "198.51.100.30", "sender": "bob@example.org"}
    assert await ask_once(mx_a, request(**first, instance="a.1")) == DEFER
    await _until(time.time() + DELAY + 0.1)
    assert (await ask_once(mx_a, request(**first, instance="a.2"))).startswith(b"action=PREPEND")
    # auto_whitelist_after = 1: a new sender from that /24 is let through on B at once.
    other = {"client_address": "198.51.100.31", "sender": "carol@example.org"}
    assert await ask_once(mx_b, request(**other, instance="b.1")) == DUNNO
