"""The fault schedule: a pure function from the run's clock to the actions due.

The runner only executes what `due_actions(previous, now, store)` returns; nothing here
touches a process. One cycle of CYCLE seconds is repeated for as long as mail is being
sent, so a short CI run sees each fault once and a long run sees every fault many times:

    0-60 s    policyd SIGKILLed every 5 s, milterd SIGKILLed every 7 s
    60-100    milterd frozen (SIGSTOP, 40 s), then SIGCONT
    100-120   Dovecot stopped (20 s)
    120-130   Postfix stopped (10 s)
    130-150   the store's fault: Redis master stopped (20 s) or the greylist disk full (20 s)
    150       Redis only: a Sentinel failover
    150-180   the DNS server unreachable (30 s: DNSBL and SPF lookups time out)

When the faults end in the middle of a cycle, `heal_actions()` says what to run: the end
of every fault whose start has run and whose end has not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Store = Literal["sqlite", "redis"]
CYCLE = 180.0
POLICYD_KILL_EVERY = 5.0
MILTERD_KILL_EVERY = 7.0
KILL_WINDOW = (0.0, 60.0)


@dataclass(frozen=True, order=True)
class Action:
    """One thing to do at `at` seconds into the run: `kind` on `target`."""

    at: float
    kind: str  # "kill", "freeze", "thaw", "stop", "start", "fill", "free", "failover"
    target: str  # "policyd", "milterd", "dovecot", "postfix", "redis", "disk", "dns", "sentinel"


# (offset in the cycle, kind, target, stores it applies to)
_WINDOWS: tuple[tuple[float, str, str, tuple[Store, ...]], ...] = (
    (60.0, "freeze", "milterd", ("sqlite", "redis")),
    (100.0, "thaw", "milterd", ("sqlite", "redis")),
    (100.0, "stop", "dovecot", ("sqlite", "redis")),
    (120.0, "start", "dovecot", ("sqlite", "redis")),
    (120.0, "stop", "postfix", ("sqlite", "redis")),
    (130.0, "start", "postfix", ("sqlite", "redis")),
    (130.0, "stop", "redis", ("redis",)),
    (150.0, "start", "redis", ("redis",)),
    (130.0, "fill", "disk", ("sqlite",)),
    (150.0, "free", "disk", ("sqlite",)),
    (152.0, "failover", "sentinel", ("redis",)),
    (150.0, "stop", "dns", ("sqlite", "redis")),
    (180.0 - 1e-6, "start", "dns", ("sqlite", "redis")),
)

_ENDS = {"thaw": "freeze", "start": "stop", "free": "fill"}
_STARTS = {start: end for end, start in _ENDS.items()}


def cycle_actions(store: Store) -> list[Action]:
    """Every action of one cycle, in order, with `at` as the offset into the cycle."""
    actions = [
        Action(k * POLICYD_KILL_EVERY, "kill", "policyd")
        for k in range(1, int(KILL_WINDOW[1] / POLICYD_KILL_EVERY))
    ]
    actions += [
        Action(k * MILTERD_KILL_EVERY, "kill", "milterd")
        for k in range(1, int(KILL_WINDOW[1] / MILTERD_KILL_EVERY) + 1)
        if k * MILTERD_KILL_EVERY < KILL_WINDOW[1]
    ]
    actions += [
        Action(at, kind, target) for at, kind, target, stores in _WINDOWS if store in stores
    ]
    return sorted(actions)


def due_actions(previous: float, now: float, store: Store) -> list[Action]:
    """The actions with previous < at <= now (seconds since the run started), in order."""
    if now <= previous:
        return []
    due: list[Action] = []
    first_cycle = int(max(previous, 0.0) // CYCLE)
    last_cycle = int(now // CYCLE)
    for cycle in range(first_cycle, last_cycle + 1):
        base = cycle * CYCLE
        for action in cycle_actions(store):
            at = base + action.at
            if previous < at <= now:
                due.append(Action(at, action.kind, action.target))
    return due


def heal_actions(done: Sequence[Action], now: float) -> list[Action]:
    """What ends the faults still in force after `done` (the actions run, in order): the end
    of each target whose last action was a start."""
    last: dict[str, Action] = {}
    for action in done:
        if action.kind in _STARTS or action.kind in _ENDS:
            last[action.target] = action
    return [Action(now, _STARTS[a.kind], a.target) for a in last.values() if a.kind in _STARTS]


def describe(store: Store) -> list[str]:
    """One line per fault, for the run's header."""
    lines = [
        f"policyd SIGKILL every {POLICYD_KILL_EVERY:g} s and milterd SIGKILL every "
        f"{MILTERD_KILL_EVERY:g} s during {KILL_WINDOW[0]:g}-{KILL_WINDOW[1]:g} s of each "
        f"{CYCLE:g}-s cycle"
    ]
    starts = [(at, kind, target) for at, kind, target, stores in _WINDOWS if store in stores]
    for at, kind, target in starts:
        if kind in _ENDS:
            continue
        end = next(
            (e for e, k, t in starts if t == target and _ENDS.get(k) == kind and e > at), None
        )
        span = f"{at:g}-{end:.0f} s" if end is not None else f"at {at:g} s"
        lines.append(f"{kind} {target}: {span}")
    return lines
