"""Benchmark (not a test): many SMTP sessions at once through the whole gateway.

    python bench/concurrency.py [--sessions 200] [--messages 400] [--clients 40]
                                [--max-connections N] [--per-client N] [--auth-rate N]
                                [--paths smtp-source,inbound,submission] [--together]
                                [--hold] [--pause 2]

The gateway of tests/e2e/test_concurrency.py (tests/fixtures/load_gateway.py): private
Postfix + Dovecot rendered from the config in a network namespace, `policyd --no-maps`
(greylisting), `mapd` (the alias socketmap) and milterd (DKIM) behind it, as the appliance
runs them; the outside network has passed greylisting once.
Each path sends `--messages` in `--sessions` sessions from `--clients` outside addresses:

- smtp-source: Postfix's `smtp-source`, one per client address, to port 25 (it aborts at
  the first refusal, so it needs limits that refuse nothing);
- inbound: the asyncio client pool of tests/fixtures/smtp_load.py, to port 25;
- submission: the pool with STARTTLS and AUTH (as alice), to port 587.

The limits default to the shipped config (mail.max_connections 100 per port,
mail.max_connections_per_client 50, mail.auth_rate_limit 10 per minute). Prints, per path:
accepted, delivered (stored by Dovecot exactly once), duplicated, lost, refused by a configured
limit, errors (anything else: an unpromised refusal, a cut session, a warning or error in any
log), the most sessions Postfix had open at once, and the pool's session times (p50/p99,
from connect to the reply to QUIT, waiting for a process included). Runs as root.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.load_gateway import CLIENTS, SERVER, USERS, LoadGateway, load_gateway
from tests.fixtures.mail_system import mail_system_factory
from tests.fixtures.smtp_load import (
    SessionPlan,
    limit_refusal,
    peak_sessions,
    percentile,
    postfix_queued,
    run_sessions,
    run_smtp_source,
)

BOB, ALICE = "bob@example.test", "alice@example.test"
SENDERS = {"smtp-source": "load-ss@remote.test", "inbound": "load-pool@remote.test"}
PATHS = ("smtp-source", "inbound", "submission")


@dataclass
class PathResult:
    path: str
    sessions: int
    clients: list[str]
    accepted: Counter[str] = field(default_factory=Counter)
    refused_by_limit: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    session_seconds: list[float] = field(default_factory=list)
    wall: float = 0.0


def _spread(count: int, clients: list[str]) -> list[str]:
    return [clients[i % len(clients)] for i in range(count)]


def run_path(gateway: LoadGateway, path: str, args: argparse.Namespace) -> PathResult:
    clients = list(CLIENTS[1 : 1 + args.clients])
    result = PathResult(path, args.sessions, clients)
    started = time.monotonic()
    if path == "smtp-source":
        per_client = max(1, args.sessions // len(clients))
        runs = run_smtp_source(
            gateway.namespace,
            [(c, gateway.port("smtp_port")) for c in clients],
            sessions=per_client,
            messages=max(1, args.messages // len(clients)),
            sender=SENDERS[path],
            recipient=BOB,
            pause=args.pause,
            timeout=args.timeout,
        )
        result.errors += [
            f"smtp-source {r.target[0]}: {r.returncode} {r.output!r}"
            for r in runs
            if r.returncode != 0 or r.output
        ]
        result.accepted = Counter(postfix_queued(gateway.mail.postfix_log, SENDERS[path]))
    else:
        submission = path == "submission"
        plan = SessionPlan(
            target=(SERVER, gateway.port("submission_port" if submission else "smtp_port")),
            sender=ALICE if submission else SENDERS[path],
            recipient=BOB,
            messages_per_session=max(1, args.messages // args.sessions),
            login=(ALICE, USERS[ALICE]) if submission else None,
            tls=gateway.mail.client_tls_context(),
            tls_server_name="mx.example.test",
            hold_after_greeting=args.hold,
            timeout=args.timeout,
        )
        outcomes = run_sessions(gateway.namespace, _spread(args.sessions, clients), plan)
        for o in outcomes:
            result.accepted.update(o.queued)
            result.session_seconds.append(o.seconds)
            limit = limit_refusal(o.refused, o.source)
            if limit is not None:
                result.refused_by_limit[limit] += 1
            elif o.refused is not None or o.error is not None:
                result.errors.append(f"{o.source}: {o.refused or o.error}")
    result.wall = time.monotonic() - started
    return result


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def report(gateway: LoadGateway, results: list[PathResult], args: argparse.Namespace) -> int:
    wanted = sum(r.accepted.total() for r in results) + 1  # + the greylisting warm-up
    stored = gateway.wait_for_delivered(BOB, wanted, args.delivery_timeout)
    log = gateway.mail.postfix_log
    log_errors = gateway.unexpected_log_lines()
    limits = gateway.mail.config.mail
    print(
        f"\n{args.sessions} sessions and {args.messages} messages per path from {args.clients} "
        f"outside addresses; limits: {limits.max_connections} sessions per port, "
        f"{limits.max_connections_per_client} per client, {limits.auth_rate_limit} AUTH/min "
        f"per client{'; paths at once' if args.together else ''}\n"
    )
    header = [
        "path", "sessions", "accepted", "delivered once", "duplicated", "lost",
        "refused by a limit", "errors", "most open at once", "session p50 s",
        "session p99 s", "wall s",
    ]  # fmt: skip
    print(_row(header))
    print(_row(["---"] * len(header)))
    failed = bool(log_errors)
    for r in results:
        once = sum(1 for q in r.accepted if stored[q] == 1)
        duplicated = sum(1 for q in r.accepted if stored[q] > 1)
        lost = sum(1 for q in r.accepted if stored[q] == 0)
        refused = ", ".join(f"{n} {k}" for k, n in r.refused_by_limit.items()) or "0"
        times = r.session_seconds
        p50 = f"{percentile(times, 0.5):.2f}" if times else "-"
        p99 = f"{percentile(times, 0.99):.2f}" if times else "-"
        peak = peak_sessions(log, set(r.clients)) if not args.together else "-"
        print(_row([
            r.path, r.sessions, r.accepted.total(), once, duplicated, lost, refused,
            len(r.errors), peak, p50, p99, f"{r.wall:.1f}",
        ]))  # fmt: skip
        failed = failed or bool(r.errors) or duplicated > 0 or lost > 0
    if args.together:
        every = {c for r in results for c in r.clients}
        print(f"\nmost sessions open at once, all paths together: {peak_sessions(log, every)}")
    for r in results:
        for line in r.errors[:10]:
            print(f"error ({r.path}): {line}")
    for line in log_errors[:20]:
        print(f"log: {line}")
    if log_errors:
        print(f"{len(log_errors)} warning or error lines in the logs")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200, help="sessions per path")
    parser.add_argument("--messages", type=int, default=400, help="messages per path")
    parser.add_argument(
        "--clients", type=int, default=40, help=f"outside addresses (<= {len(CLIENTS) - 1})"
    )
    parser.add_argument("--max-connections", type=int, help="mail.max_connections")
    parser.add_argument("--per-client", type=int, help="mail.max_connections_per_client")
    parser.add_argument("--auth-rate", type=int, help="mail.auth_rate_limit")
    parser.add_argument("--policyd-max-connections", type=int, help="policyd.max_connections")
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS)
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="run the paths at the same time (at the shipped limits the pool's burst of 200 "
        "on port 25 and smtp-source's sessions together outrun its listen backlog of 100: "
        "see tests/e2e/test_concurrency.py)",
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="pool sessions wait after the greeting until all have one",
    )
    parser.add_argument(
        "--pause",
        type=int,
        default=2,
        help="smtp-source: seconds between a session's messages (-d -w)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on each path's run")
    parser.add_argument("--delivery-timeout", type=float, default=300.0)
    parser.add_argument(
        "--daemon-nofile",
        type=int,
        help="open-file soft limit for policyd, mapd and milterd (systemd's default is 1024)",
    )
    parser.add_argument("--keep-logs", type=Path, help="copy every daemon's log to this directory")
    args = parser.parse_args()
    if not 1 <= args.clients < len(CLIENTS):
        parser.error(f"--clients must be 1 .. {len(CLIENTS) - 1}")
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    mail = {
        key: value
        for key, value in (
            ("max_connections", args.max_connections),
            ("max_connections_per_client", args.per_client),
            ("auth_rate_limit", args.auth_rate),
        )
        if value is not None
    }
    print("command: python bench/concurrency.py " + " ".join(sys.argv[1:]))
    # The e2e fixture's factory, used as a context manager outside pytest (it stops and
    # removes every instance it started when the block ends).
    wrapped = mail_system_factory.__wrapped__  # type: ignore[attr-defined]  # pytest sets it
    factory_fixture = contextlib.contextmanager(wrapped)
    policyd = {}
    if args.policyd_max_connections is not None:
        policyd["max_connections"] = args.policyd_max_connections
    with (
        factory_fixture() as factory,
        load_gateway(factory, mail, policyd, daemon_open_files=args.daemon_nofile) as gateway,
    ):
        gateway.pass_greylisting()
        if args.together:
            with ThreadPoolExecutor(len(paths)) as pool:
                results = list(pool.map(lambda p: run_path(gateway, p, args), paths))
        else:
            results = [run_path(gateway, p, args) for p in paths]
        code = report(gateway, results, args)
        if args.keep_logs is not None:
            keep_logs(gateway, args.keep_logs)
        return code


def keep_logs(gateway: LoadGateway, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    layout = gateway.mail.layout
    for name, source in (
        ("postfix.log", layout.maillog_file),
        ("dovecot.log", layout.dovecot_log_file),
        ("policyd.log", gateway.policyd.log_path),
        ("mapd.log", gateway.mapd_log),
        ("milterd.log", gateway.milterd.log_path),
        ("main.cf", layout.postfix_dir / "main.cf"),
        ("master.cf", layout.postfix_dir / "master.cf"),
    ):
        if source is not None and source.exists():
            shutil.copy(source, directory / name)
    print(f"logs and the rendered Postfix config kept in {directory}")


if __name__ == "__main__":
    sys.exit(main())
