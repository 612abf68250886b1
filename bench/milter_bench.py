"""Benchmark (not a test): DKIM signing throughput of milterd, OpenDKIM and dkimpy-milter.

One pure-Python milter client (tests/fixtures/milter_client.py, the one the integration
tests use) drives each milter the way Postfix does, over a unix socket, with the same
RSA-2048 key and the same 4-20 KB messages, at 1, 4 and 16 concurrent connections (each
connection carries many messages, as a busy SMTP session would). Every run is bounded in
messages and seconds. A sample of the signed messages is verified with dkimpy against the
public key. Prints messages/s and the ratio of each milter to the others.

    python bench/milter_bench.py [--messages 2000] [--seconds 10] [--rounds 3]
                                 [--connections 1,4,16] [--only milterd,opendkim]

Needs Debian's `opendkim` and `dkimpy-milter` packages; all three run privately from a temp
directory and are stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postwarden.dkim.keys import generate_key, txt_record, write_key
from postwarden.dkim.verification import KeyNotFoundError, verify_message
from tests.fixtures.milter_client import MilterClient, MilterProtocolError

DOMAIN = "bench.test"
SELECTOR = "s1"
CLIENT_IP = "127.0.0.1"  # "internal" for all three: they sign, they do not verify
START_TIMEOUT = 20.0
WARMUP = 20
SAMPLE_EVERY = 25
TEXT = (
    "the quarterly report shows revenue growth across all regions while costs remained "
    "stable and the board approved the new budget for next year including hiring plans"
)


@dataclass
class Milter:
    name: str
    socket_path: Path
    command: list[str]
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, directory: Path) -> None:
        self.log_path = directory / f"{self.name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=directory,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited at start:\n{self.log_path.read_text()}")
            with contextlib.suppress(OSError, MilterProtocolError):
                with MilterClient.unix(str(self.socket_path), 2.0) as client:
                    client.negotiate()
                return
            time.sleep(0.05)
        raise SystemExit(f"{self.name} did not answer within {START_TIMEOUT}s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        # libmilter notices a stop between 5-second accept rounds: wake it.
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.socket_path))
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)


@dataclass
class Run:
    milter: str
    connections: int
    messages: int = 0
    seconds: float = 0.0
    unsigned: int = 0
    samples: list[bytes] = field(default_factory=list)
    verified: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def corpus(count: int, seed: int = 7) -> list[bytes]:
    """Plain-text messages of 4-20 KB from the signed domain."""
    rng = random.Random(seed)
    words = TEXT.split()
    messages = []
    for i in range(count):
        size = rng.randint(4 * 1024, 20 * 1024)
        lines = []
        total = 0
        while total < size:
            line = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "\r\n"
            lines.append(line)
            total += len(line)
        headers = (
            f"From: User {i} <user{i}@{DOMAIN}>\r\n"
            f"To: Someone <someone{i}@example.net>\r\n"
            f"Subject: report number {i}\r\n"
            f"Date: Tue, 01 Jan 2030 00:00:{i % 60:02d} +0000\r\n"
            f"Message-ID: <bench-{i}@{DOMAIN}>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        )
        messages.append((headers + "".join(lines)).encode())
    return messages


def drive(path: Path, messages: list[bytes], connections: int, limit: int, seconds: float) -> Run:
    """`connections` threads, each one milter connection, sending until `limit` or `seconds`."""
    run = Run(path.name, connections)
    lock = threading.Lock()
    counter = iter(range(limit))
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def worker() -> None:
        try:
            with MilterClient.unix(str(path), 60.0) as client:
                client.negotiate()
                client.connect(CLIENT_IP, hostname="localhost")
                while time.monotonic() < deadline:
                    with lock:
                        n = next(counter, None)
                    if n is None:
                        return
                    message = messages[n % len(messages)]
                    result = client.message(message, mail_from=f"<user@{DOMAIN}>")
                    with lock:
                        run.messages += 1
                        if not result.headers_named("DKIM-Signature"):
                            run.unsigned += 1
                        elif n % SAMPLE_EVERY == 0:
                            run.samples.append(result.apply(message))
        except (OSError, MilterProtocolError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 60)
    run.seconds = time.monotonic() - started
    if errors:
        print(f"  client errors: {errors[:3]}", file=sys.stderr)
    return run


def verify_samples(run: Run, record: bytes) -> None:
    name = f"{SELECTOR}._domainkey.{DOMAIN}.".encode()

    def dnsfunc(qname: bytes, timeout: float = 5.0) -> bytes:
        if qname != name:
            raise KeyNotFoundError(qname.decode())
        return record

    run.verified = sum(
        1 for m in run.samples if [r.result for r in verify_message(m, dnsfunc)] == ["pass"]
    )


def configure(directory: Path, key: Path) -> list[Milter]:
    """Each milter privately in `directory`, same key, relaxed/relaxed, From oversigned."""
    postwarden = str(Path(sys.executable).with_name("postwarden"))
    pw_conf = directory / "postwarden.toml"
    pw_conf.write_text(
        f'[milterd]\nlisten = ["unix:{directory}/milterd.sock"]\nlog_level = "warning"\n'
        f'[frontd]\nenabled = true\nmilter_listen = "unix:{directory}/milter-front.sock"\n'
        f'log_level = "warning"\n'
        f'[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "{SELECTOR}"\nkey = "{key}"\n'
    )
    common = (
        f"Syslog no\nUMask 007\nDomain {DOMAIN}\nSelector {SELECTOR}\nKeyFile {key}\n"
        "Canonicalization relaxed/relaxed\nMode s\nInternalHosts 127.0.0.1\nUserID root\n"
    )
    od_conf = directory / "opendkim.conf"
    od_conf.write_text(
        common + f"Socket local:{directory}/opendkim.sock\nBackground no\n"
        "OversignHeaders From\nRequireSafeKeys false\n"
    )
    dp_conf = directory / "dkimpy-milter.conf"
    dp_conf.write_text(
        common + f"Socket local:{directory}/dkimpy.sock\nPidFile {directory}/dkimpy.pid\n"
    )
    return [
        Milter(
            "milterd", directory / "milterd.sock", [postwarden, "--config", str(pw_conf), "milterd"]
        ),
        # The appliance's path: Postfix talks to frontd, which passes bytes to milterd (so
        # this one needs "milterd" started before it, as the list order does).
        Milter(
            "milterd via frontd",
            directory / "milter-front.sock",
            [postwarden, "--config", str(pw_conf), "frontd"],
        ),
        Milter("opendkim", directory / "opendkim.sock", ["opendkim", "-f", "-x", str(od_conf)]),
        Milter("dkimpy-milter", directory / "dkimpy.sock", ["dkimpy-milter", str(dp_conf)]),
    ]


@contextlib.contextmanager
def running(milters: list[Milter], directory: Path) -> Iterator[None]:
    try:
        for milter in milters:
            milter.start(directory)
        yield
    finally:
        for milter in milters:
            milter.stop()


def table(runs: list[Run]) -> str:
    by = {(r.milter, r.connections): r for r in runs}
    names = list(dict.fromkeys(r.milter for r in runs))
    header = (
        "| milter | connections | messages | seconds | msg/s | "
        + " | ".join(f"vs {n}" for n in names)
        + " | sampled signatures verified |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in runs:
        ratios = []
        for other in names:
            base = by.get((other, r.connections))
            ratios.append(f"{r.rate / base.rate:.2f}x" if base and base.rate else "-")
        lines.append(
            f"| {r.milter} | {r.connections} | {r.messages} | {r.seconds:.1f} | {r.rate:.0f} | "
            + " | ".join(ratios)
            + f" | {r.verified}/{len(r.samples)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (bound)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per run (bound)")
    parser.add_argument("--connections", default="1,4,16", help="comma-separated")
    parser.add_argument("--only", default="", help="comma-separated milter names")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median shown)")
    args = parser.parse_args()
    for tool in ("opendkim", "dkimpy-milter"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 2
    levels = [int(x) for x in args.connections.split(",")]
    messages = corpus(60)
    directory = Path(tempfile.mkdtemp(prefix="milterbench-"))
    try:
        key_file = directory / "bench.key"
        key = generate_key("rsa-sha256", 2048)
        write_key(key, key_file)
        record = txt_record(key).encode()
        milters = configure(directory, key_file)
        if args.only:
            milters = [m for m in milters if m.name in args.only.split(",")]
        names = [m.name for m in milters]
        runs: dict[tuple[str, int], list[Run]] = {}
        with running(milters, directory):
            for milter in milters:
                drive(milter.socket_path, messages, 1, WARMUP, 30.0)  # warm caches and pools
            # Rounds interleave the milters, so a burst of load elsewhere on the host hits
            # all of them alike; the table shows each one's median round.
            for round_no in range(1, args.rounds + 1):
                for level in levels:
                    for milter in milters:
                        run = drive(
                            milter.socket_path, messages, level, args.messages, args.seconds
                        )
                        run.milter = milter.name
                        verify_samples(run, record)
                        runs.setdefault((milter.name, level), []).append(run)
                        print(
                            f"round {round_no} {milter.name:14} {level:3} conns: "
                            f"{run.messages:5} msgs in {run.seconds:5.1f}s = {run.rate:6.0f} msg/s "
                            f"(unsigned {run.unsigned}, "
                            f"verified {run.verified}/{len(run.samples)})",
                            flush=True,
                        )
        medians = [
            sorted(rs, key=lambda r: r.rate)[len(rs) // 2]
            for (_, _), rs in sorted(runs.items(), key=lambda kv: (names.index(kv[0][0]), kv[0][1]))
        ]
        all_runs = [r for rs in runs.values() for r in rs]
        sizes = [len(m) for m in messages]
        print(
            f"\n{len(messages)} messages of {min(sizes) // 1024}-{max(sizes) // 1024} KB, "
            f"RSA-2048, relaxed/relaxed, unix sockets, {os.cpu_count()} CPUs\n"
        )
        print(f"median of {args.rounds} interleaved rounds\n")
        print(table(medians))
        failed = any(r.unsigned or r.verified != len(r.samples) for r in all_runs)
        return 1 if failed else 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
