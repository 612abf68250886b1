"""The fault harness of issue #14 (`make chaos`, `make chaos-ci`) and the soak (`make soak`).

    python -m bench.chaos run  [--messages 10000] [--sessions 10] [--store both|sqlite|redis]
    python -m bench.chaos soak [--minutes 30] [--rate 5]

Run as root from the repository root (Postfix's master needs root; a network namespace is
created). The command re-executes itself inside a private network namespace (see
bench/chaos/rig.py), starts the gateway there, sends the mail while the schedule
(bench/chaos/schedule.py) breaks its parts, restores every part, lets Postfix drain its
queue (bounded), then counts where each message ended (bench/chaos/accounting.py). The
exit status is 1 when a message was lost, duplicated or accepted unchecked, and with
--gave-up-fails also when a sender gave up (a message never accepted after all retries;
the "gave up" column and the `result:` line show them either way).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from bench.chaos.schedule import CYCLE, Action

INSIDE = "POSTWARDEN_CHAOS_NAMESPACE"
# A small run still meets every fault of the cycle once, with a margin for the last one.
CYCLE_SECONDS = CYCLE + 5.0


def _in_namespace(argv: list[str]) -> int:
    """Run this command again inside a new private network namespace; delete it after."""
    name = f"pwchaos-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        env = {**os.environ, INSIDE: name, "PYTHONUNBUFFERED": "1"}
        command = ["ip", "netns", "exec", name, sys.executable, "-m", "bench.chaos", *argv]
        inner = subprocess.Popen(command, env=env)  # `ip netns exec` execs the interpreter

        def forward(signum: int, _frame: object) -> None:
            inner.send_signal(signal.SIGINT)  # the inner run stops every part it started

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return inner.wait()
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)


def _log(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f} s] {text}", flush=True)


class FaultRunner(threading.Thread):
    """Executes the schedule's actions and restarts dead daemons until told to stop."""

    def __init__(
        self, rig: object, store: str, t0: float, quiet: bool = False, cycles: int = 0
    ) -> None:
        super().__init__(name="faults", daemon=True)
        self.rig, self.store, self.t0 = rig, store, t0
        # 0: the cycle repeats while mail is sent; N: the faults end after N cycles.
        self.until = cycles * CYCLE if cycles else float("inf")
        self.sending = threading.Event()
        self.sending.set()
        self.finished = threading.Event()
        self.actions_done = 0
        self.done: list[Action] = []
        self.quiet = quiet

    def run(self) -> None:
        from bench.chaos.schedule import due_actions, heal_actions

        rig = self.rig
        previous = 0.0
        healed = False
        while not self.finished.is_set():
            now = time.monotonic() - self.t0
            if self.sending.is_set() and now >= self.until:
                self.sending.clear()
            if self.sending.is_set():
                for action in due_actions(previous, now, self.store):  # type: ignore[arg-type]
                    self._do(action)
                previous = now
            elif not healed:
                for action in heal_actions(self.done, now):
                    self._do(action)
                healed = True
            rig.restart_dead(now)  # type: ignore[attr-defined]
            time.sleep(0.1)

    def _do(self, action: object) -> None:
        try:
            done = self.rig.execute(action)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a failed fault is reported, the run goes on
            done = f"FAILED {action}: {type(exc).__name__}: {exc}"
        self.actions_done += 1
        self.done.append(action)  # type: ignore[arg-type]
        if not self.quiet or "kill" not in str(getattr(action, "kind", "")):
            _log(self.t0, done)


def run_chaos(args: argparse.Namespace) -> int:
    from bench.chaos.accounting import render_table, render_verdict, tally
    from bench.chaos.rig import RESTART_DELAY, RigOptions, running_rig
    from bench.chaos.schedule import describe
    from bench.chaos.sender import Ports, SenderConfig, plan_messages, send_all

    stores = ["sqlite", "redis"] if args.store == "both" else [args.store]
    failed = False
    reports = []
    for store in stores:
        t_setup = time.monotonic()
        options = RigOptions(
            store=store,  # type: ignore[arg-type]
            greylist_delay=args.greylist_delay,
            restarts=args.restarts,
            policy_default_action=args.policy_default_action,
            policy_unreachable_action=args.policy_unreachable_action,
            aliases_socketmap=not args.no_aliases_socketmap,
            mapd=not args.no_mapd,
            frontd=not args.no_frontd,
        )
        with running_rig(options, keep=args.keep) as rig:
            t0 = time.monotonic()
            _log(t0, f"store {store}: gateway up in {t0 - t_setup:.1f} s under {rig.root}")
            for line in describe(store):  # type: ignore[arg-type]
                _log(t0, f"fault: {line}")
            if rig.restart_mode == "supervise":
                names = ", ".join(d.name for d in rig.daemons)
                _log(t0, f"restarts: `postwarden supervise` runs each of {names}")
            else:
                _log(t0, f"restarts: the HARNESS restarts a dead daemon after {RESTART_DELAY} s")
            messages = plan_messages(args.messages, args.seed + (store == "redis"), Ports())
            # New messages are spread over at least one whole cycle, so that even a small
            # run meets every fault once (retries are never held back).
            config = SenderConfig(
                sessions=args.sessions,
                tls=rig.mail.client_tls_context(),
                rate=args.messages / max(args.min_duration, 1.0),
            )
            runner = FaultRunner(rig, store, t0, quiet=args.quiet, cycles=args.cycles)
            runner.start()
            try:
                outcomes = asyncio.run(send_all(messages, config))
            except BaseException:
                # The fault thread must stop before the rig does: a "postfix start" it ran
                # after the rig's abort left a Postfix running in a deleted namespace.
                runner.finished.set()
                runner.join(60)
                raise
            finally:
                runner.sending.clear()
            sent_for = time.monotonic() - t0
            _log(t0, f"sending done after {sent_for:.0f} s; faults ended; draining the queue")
            time.sleep(3.0)
            drain_deadline = time.monotonic() + args.drain
            size = -1
            while time.monotonic() < drain_deadline:
                rig.flush()
                time.sleep(5.0)
                size = len(rig.postqueue())
                if size == 0:
                    break
                _log(t0, f"queue holds {size}")
            time.sleep(2.0)  # the last LMTP deliveries land
            runner.finished.set()
            runner.join(60)
            delivered, mailbox_bounces, files = rig.mailbox_tokens()
            queued, queue_bounces, queue_size = rig.queued_tokens()
            result = tally(outcomes, delivered, queued, mailbox_bounces | queue_bounces)
            title = (
                f"store={store}: {args.messages} messages, {args.sessions} sessions, "
                f"{sent_for:.0f} s of faults"
            )
            table = render_table(result, title)
            extra = [
                f"{d.name} ({rig.restart_mode}): {d.kills} SIGKILLs; "
                + ", ".join(f"{k} {v}" for k, v in rig.daemon_log_counts(d).items())
                + f"; {rig.downtimes[d.name].describe()}"
                for d in rig.daemons
            ]
            inbound_queued, unlogged = rig.unlogged_decisions()
            extra += [
                f"policyd decision lines: {unlogged} of {inbound_queued} messages queued on "
                "port 25 (queue ids assigned) have no policyd line with that queue id",
                f"mailbox files {files}, queue at the end {queue_size}, fault actions "
                f"{runner.actions_done}",
                "postfix log: " + ", ".join(f"{k}={v}" for k, v in rig.log_counts().items()),
                *rig.notes,
                *(f"unsigned: {why}" for why in rig.unsigned_files[:5]),
            ]
            for name, sample in result.examples.items():
                if name in ("lost", "duplicated", "unchecked", "unsigned", "gave_up"):
                    extra.append(f"{name} e.g. " + "; ".join(sample))
            verdict = render_verdict(result, count_gave_up=args.gave_up_fails)
            report = table + "\n\n" + "\n".join(f"- {x}" for x in extra) + "\n\n" + verdict
            print("\n" + report + "\n", flush=True)
            reports.append(report)
            failed = failed or bool(result.failures(count_gave_up=args.gave_up_fails))
    if args.output:
        Path(args.output).write_text("\n\n".join(reports) + "\n")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the fault run")
    run.add_argument("--messages", type=int, default=10_000)
    run.add_argument("--sessions", type=int, default=10)
    run.add_argument("--store", choices=("both", "sqlite", "redis"), default="both")
    run.add_argument("--seed", type=int, default=14)
    run.add_argument("--greylist-delay", type=float, default=2.0)
    run.add_argument("--drain", type=float, default=600.0, help="seconds to let the queue drain")
    run.add_argument(
        "--min-duration",
        type=float,
        default=CYCLE_SECONDS,
        help="spread new messages over at least this many seconds (default: one fault cycle)",
    )
    run.add_argument(
        "--cycles",
        type=int,
        default=0,
        help="end the faults after this many cycles (default 0: repeat while sending)",
    )
    run.add_argument(
        "--restarts",
        choices=("auto", "supervise", "harness"),
        default="auto",
        help="who restarts a killed daemon (auto: `postwarden supervise` when it exists)",
    )
    run.add_argument(
        "--policy-default-action",
        help="policyd.default_action for this run (default: the product's default)",
    )
    run.add_argument(
        "--policy-unreachable-action",
        help="policyd.unreachable_action (what Postfix does when policyd is down)",
    )
    run.add_argument(
        "--no-aliases-socketmap",
        action="store_true",
        help="Postfix's aliases not on policyd's socketmap (the README's quick start)",
    )
    run.add_argument(
        "--no-mapd",
        action="store_true",
        help="policyd serves Postfix's lookup maps itself (no `postwarden mapd`)",
    )
    run.add_argument(
        "--no-frontd",
        action="store_true",
        help="Postfix talks to milterd and Dovecot's auth socket directly (no `postwarden frontd`)",
    )
    run.add_argument(
        "--gave-up-fails",
        action="store_true",
        help="exit 1 also when a sender gave up (a message never accepted after all retries)",
    )
    run.add_argument("--output", help="also write the tables to this file")
    run.add_argument("--keep", action="store_true", help="keep the run's directory")
    run.add_argument("--quiet", action="store_true", help="do not log every SIGKILL")
    soak = sub.add_parser("soak", help="steady load, no faults: growth of RSS, fds, latency")
    soak.add_argument("--minutes", type=float, default=30.0)
    soak.add_argument("--rate", type=float, default=5.0, help="messages per second")
    soak.add_argument("--sessions", type=int, default=10)
    soak.add_argument("--limit", type=float, default=10.0, help="allowed growth, percent")
    soak.add_argument("--output", help="also write the table to this file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root: Postfix's master and the network namespace need it", file=sys.stderr)
        return 2
    if INSIDE not in os.environ:
        return _in_namespace(sys.argv[1:])
    # SIGTERM (make's or CI's timeout) unwinds like Ctrl-C: every part is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.command == "run":
            return run_chaos(args)
        from bench.chaos.soak import run_soak

        return run_soak(args)
    except BaseException as exc:
        # tests/fixtures report a part that cannot start with pytest.fail (a BaseException).
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        print(f"chaos harness failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
