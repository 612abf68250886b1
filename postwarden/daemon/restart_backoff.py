"""When a supervised daemon that exited is started again: a pure decision, the clock passed in.

docs/ARCHITECTURE.md, "Supervision": a daemon that dies is serving again within 2 s (at
once after a run that had stayed up, else after RESTART_DELAY); one that keeps dying right
after it starts backs off (doubling up to MAX_DELAY) and the supervisor says so once, and
once more when it stays up.
"""

from __future__ import annotations

from dataclasses import dataclass

# A daemon that had run and then died is started again this soon: its start-up (about a
# second for milterd) is what Postfix waits for.
FIRST_RESTART_DELAY = 0.1
# An exit this soon after the start is a daemon failing at start (a socket in use, a key
# it cannot read), not one killed or crashed while serving: start-up takes 0.5-1.5 s. One
# killed every few seconds from outside keeps being restarted at once.
QUICK_EXIT_WITHIN = 3.0
# After a quick exit, this long: a daemon failing at once does not spin, and Postfix's
# next try still finds it.
RESTART_DELAY = 0.25
# A backing-off daemon that has run this long has "stayed up": the backoff is over.
STABLE_AFTER = 10.0
# Quick exits in a row tolerated at RESTART_DELAY before backing off.
QUICK_EXITS_TOLERATED = 3
MAX_DELAY = 60.0


@dataclass(frozen=True)
class RestartState:
    """What the supervisor remembers between exits of one daemon."""

    quick_exits: int = 0  # consecutive exits within QUICK_EXIT_WITHIN of their start
    backing_off: bool = False


@dataclass(frozen=True)
class RestartDecision:
    delay: float  # seconds to wait before starting the daemon again
    state: RestartState
    starts_backing_off: bool  # the one moment to say "keeps dying"


def after_exit(state: RestartState, started_at: float, exited_at: float) -> RestartDecision:
    """The delay before the next start of a daemon that ran from `started_at` to `exited_at`."""
    quick = exited_at - started_at < QUICK_EXIT_WITHIN
    quick_exits = state.quick_exits + 1 if quick else 0
    over = quick_exits - QUICK_EXITS_TOLERATED
    if over <= 0:
        delay = RESTART_DELAY if quick else FIRST_RESTART_DELAY
        return RestartDecision(delay, RestartState(quick_exits, False), False)
    delay = min(MAX_DELAY, RESTART_DELAY * 2.0**over)
    return RestartDecision(delay, RestartState(quick_exits, True), not state.backing_off)


def stayed_up(state: RestartState, started_at: float, now: float) -> RestartState | None:
    """The state once a backing-off daemon has run STABLE_AFTER; None while nothing changes."""
    if state.backing_off and now - started_at >= STABLE_AFTER:
        return RestartState()
    return None
