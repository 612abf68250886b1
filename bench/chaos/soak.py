"""The soak (`make soak`): the gateway under a steady load for N minutes, no faults.

The same private gateway as the fault run (bench/chaos/rig.py, SQLite store), the same
sender at a fixed rate (messages per second). Every SAMPLE_EVERY seconds it reads the
resident memory (VmRSS in /proc/PID/status) and open descriptors (/proc/PID/fd) of each
daemon (policyd, milterd, and mapd when run), summed over the daemon and every process it
started; a probe asks policyd directly on its socket PROBE_RATE times a second (an inbound
RCPT request from one of a rotating set of triplets, as Postfix sends it) and times the
answer. The figures of the first and of the last minute are compared: the median of the
samples for memory and descriptors, the p99 for latency. The exit status is 1 when one
grows by more than `--limit` percent.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.chaos.accounting import percentile, render_table, tally
from bench.chaos.rig import Daemon, RigOptions, running_rig
from bench.chaos.sender import Ports, SenderConfig, plan_messages, send_all

SAMPLE_EVERY = 5.0
PROBE_RATE = 20.0
WINDOW = 60.0  # seconds: "the start" and "the end"
PROBE_TRIPLETS = 500


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return 0


@dataclass
class Samples:
    """(seconds since start, value) per measured series."""

    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def add(self, name: str, at: float, value: float) -> None:
        self.series.setdefault(name, []).append((at, value))

    def window(self, name: str, start: float, end: float) -> list[float]:
        return [v for t, v in self.series.get(name, []) if start <= t < end]


def probe_request(n: int) -> bytes:
    """An inbound RCPT request, as smtpd sends it; one of PROBE_TRIPLETS triplets."""
    k = n % PROBE_TRIPLETS
    return (
        "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
        f"client_address=198.51.100.{2 + k % 5}\nclient_name=mail.remote.test\n"
        "helo_name=mail.remote.test\n"
        f"sender=probe{k}@remote.test\nrecipient=bob@example.test\n"
        f"instance=soak.{n}\nsize=0\n\n"
    ).encode()


class Probe(threading.Thread):
    def __init__(self, socket_path: Path, t0: float, samples: Samples, stop: threading.Event):
        super().__init__(name="probe", daemon=True)
        self.path, self.t0, self.samples, self.stop_event = socket_path, t0, samples, stop
        self.errors = 0

    def run(self) -> None:
        n = 0
        sock: socket.socket | None = None
        reader = None
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                if sock is None:
                    sock = socket.socket(socket.AF_UNIX)
                    sock.settimeout(10)
                    sock.connect(str(self.path))
                    reader = sock.makefile("rb")
                sock.sendall(probe_request(n))
                assert reader is not None
                answer = reader.readline()
                reader.readline()  # the empty line ending the answer
                if not answer.startswith(b"action="):
                    raise OSError(f"bad answer {answer!r}")
                self.samples.add("policy_ms", started - self.t0, (time.monotonic() - started) * 1e3)
            except OSError:
                self.errors += 1
                if sock is not None:
                    sock.close()
                sock = None
            n += 1
            time.sleep(max(0.0, 1.0 / PROBE_RATE - (time.monotonic() - started)))
        if sock is not None:
            sock.close()


def sample_daemon(daemon: Daemon, at: float, samples: Samples) -> None:
    pids = daemon.pids()
    samples.add(f"{daemon.name}_rss_kib", at, sum(rss_kib(p) for p in pids))
    samples.add(f"{daemon.name}_fds", at, sum(open_fds(p) for p in pids))
    samples.add(f"{daemon.name}_processes", at, len(pids))


def growth_table(samples: Samples, duration: float, limit: float) -> tuple[str, bool]:
    rows = []
    failed = False
    end_start = max(WINDOW, duration - WINDOW)
    for name in sorted(samples.series):
        first = samples.window(name, 0.0, WINDOW)
        last = samples.window(name, end_start, duration + 1)
        if not first or not last:
            continue
        if name == "policy_ms":
            a, b, label = percentile(first, 99), percentile(last, 99), "p99 policy latency (ms)"
        else:
            a, b, label = statistics.median(first), statistics.median(last), name
        grow = (b - a) / a * 100 if a else 0.0
        bad = grow > limit and not name.endswith("_processes")
        failed = failed or bad
        rows.append(f"| {label} | {a:.2f} | {b:.2f} | {grow:+.1f}% | {'FAIL' if bad else 'ok'} |")
    head = [
        f"| measure | first {WINDOW:.0f} s | last {WINDOW:.0f} s | growth | < {limit:g}% |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows), failed


def run_soak(args: argparse.Namespace) -> int:
    duration = args.minutes * 60.0
    count = int(args.rate * duration)
    samples = Samples()
    with running_rig(RigOptions(store="sqlite")) as rig:
        t0 = time.monotonic()
        print(f"soak: {args.minutes:g} min, {args.rate:g} messages/s ({count}), no faults")
        stop = threading.Event()
        probe = Probe(rig.root / "p" / "policyd.sock", t0, samples, stop)
        probe.start()

        def sampler() -> None:
            while not stop.is_set():
                at = time.monotonic() - t0
                for daemon in rig.daemons:
                    sample_daemon(daemon, at, samples)
                stop.wait(SAMPLE_EVERY)

        sampling = threading.Thread(target=sampler, name="sampler", daemon=True)
        sampling.start()
        messages = plan_messages(count, 30, Ports())
        config = SenderConfig(
            sessions=args.sessions, tls=rig.mail.client_tls_context(), rate=args.rate
        )
        outcomes = asyncio.run(send_all(messages, config))
        elapsed = time.monotonic() - t0
        stop.set()
        probe.join(15)
        sampling.join(15)
        for _ in range(12):
            rig.flush()
            if not rig.postqueue():
                break
            time.sleep(5)
        delivered, mailbox_bounces, _ = rig.mailbox_tokens()
        queued, queue_bounces, _ = rig.queued_tokens()
        result = tally(outcomes, delivered, queued, mailbox_bounces | queue_bounces)
        table, grew = growth_table(samples, elapsed, args.limit)
        restarts = sum(d.restarts for d in rig.daemons)
        report = "\n\n".join(
            [
                f"### soak: {args.minutes:g} min at {args.rate:g} messages/s, {elapsed:.0f} s",
                table,
                f"- policy probe: {len(samples.series.get('policy_ms', []))} requests, "
                f"{probe.errors} errors; daemon restarts {restarts}",
                *(f"- unsigned: {why}" for why in rig.unsigned_files[:5]),
                render_table(result, "soak mail"),
            ]
        )
        print("\n" + report + "\n", flush=True)
        if args.output:
            Path(args.output).write_text(report + "\n")
    return 1 if grew or result.failed or probe.errors else 0
