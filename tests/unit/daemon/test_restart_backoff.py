"""When a supervised daemon is started again: every boundary of the backoff, on a fake clock."""

from __future__ import annotations

import pytest

from postwarden.daemon.restart_backoff import (
    FIRST_RESTART_DELAY,
    MAX_DELAY,
    QUICK_EXIT_WITHIN,
    QUICK_EXITS_TOLERATED,
    RESTART_DELAY,
    STABLE_AFTER,
    RestartState,
    after_exit,
    stayed_up,
)


def _exits(count: int, ran: float) -> list[tuple[float, bool, RestartState]]:
    """(delay, starts_backing_off, state) after each of `count` exits, each after `ran` s."""
    state, now, out = RestartState(), 0.0, []
    for _ in range(count):
        decision = after_exit(state, now, now + ran)
        state = decision.state
        out.append((decision.delay, decision.starts_backing_off, state))
        now += ran + decision.delay
    return out


def test_a_crash_after_a_long_run_restarts_at_once() -> None:
    decision = after_exit(RestartState(), started_at=100.0, exited_at=100.0 + 3600)
    assert decision.delay == FIRST_RESTART_DELAY < RESTART_DELAY < 2.0
    assert decision.state == RestartState(0, False)
    assert not decision.starts_backing_off


def test_quick_exits_up_to_the_tolerance_restart_at_once() -> None:
    delays = [d for d, _, _ in _exits(QUICK_EXITS_TOLERATED, ran=0.1)]
    assert delays == [RESTART_DELAY] * QUICK_EXITS_TOLERATED


def test_the_next_quick_exit_backs_off_doubling_up_to_the_cap_and_says_so_once() -> None:
    decisions = _exits(QUICK_EXITS_TOLERATED + 12, ran=0.1)[QUICK_EXITS_TOLERATED:]
    delays = [d for d, _, _ in decisions]
    assert delays[:4] == [n * RESTART_DELAY for n in (2, 4, 8, 16)]
    assert delays == sorted(delays) and max(delays) == MAX_DELAY
    assert [announce for _, announce, _ in decisions] == [True] + [False] * 11


@pytest.mark.parametrize(
    ("ran", "counts_as_quick"), [(QUICK_EXIT_WITHIN - 0.001, True), (QUICK_EXIT_WITHIN, False)]
)
def test_a_run_of_quick_exit_within_seconds_is_not_quick(ran: float, counts_as_quick: bool) -> None:
    decision = after_exit(RestartState(quick_exits=5, backing_off=True), 0.0, ran)
    assert (decision.state.quick_exits > 0) is counts_as_quick


def test_a_long_run_ends_the_backoff_and_the_next_backoff_is_announced_again() -> None:
    backing = RestartState(quick_exits=QUICK_EXITS_TOLERATED + 2, backing_off=True)
    assert after_exit(backing, 0.0, STABLE_AFTER + 1).delay == FIRST_RESTART_DELAY
    again = _exits(QUICK_EXITS_TOLERATED + 1, ran=0.1)
    assert again[-1][1] is True


def test_stayed_up_resets_only_a_backing_off_state_and_only_after_stable_after() -> None:
    backing = RestartState(quick_exits=7, backing_off=True)
    assert stayed_up(backing, started_at=10.0, now=10.0 + STABLE_AFTER - 0.01) is None
    assert stayed_up(backing, started_at=10.0, now=10.0 + STABLE_AFTER) == RestartState()
    assert stayed_up(RestartState(quick_exits=2), started_at=0.0, now=1e6) is None


def test_a_daemon_killed_every_few_seconds_is_restarted_at_once_every_time() -> None:
    # The fault harness SIGKILLs policyd every 5 s: that is not a daemon failing at start,
    # and backing off only made each outage longer (17 s once).
    delays = [d for d, _, _ in _exits(20, ran=QUICK_EXIT_WITHIN + 1.0)]
    assert delays == [FIRST_RESTART_DELAY] * 20
