#!/usr/bin/env python3
"""Policy-server benchmark: postwarden policyd against Debian's postgrey, same request stream.

Not a test: run by hand (`python bench/policy_bench.py`, or `make bench-policy`). It starts
every server privately (loopback ports, temp dirs), drives it with Postfix-style RCPT
requests over keep-alive connections and prints one markdown table, also written to
`bench/results/policy.md`.

Scenarios (each a fresh server and store):

- `new`: greylisting on (delay 300 s), every triplet new, so every request is a store
  miss plus a store write and a DEFER; policyd on SQLite. THE target scenario.
- `repeat`: a pool of triplets seen once before, greylisting delay 1 s already elapsed,
  so requests pass (store hit plus update, networks auto-whitelisted after 5 passes).
- `redis`: `new` with policyd on a private redis-server.
- `lists`: 1,000,000 permitted/forbidden entries imported with `postwarden lists import`,
  greylisting off; 3 requests in 4 hit an entry (forbidden IP, forbidden domain,
  permitted mailbox), so the answer is decided by list lookups alone. postgrey has no
  equivalent, so its ratio is to postgrey's `new` cell at the same connection count.

The load generator runs in separate processes (one per 64 connections), each an asyncio
loop of `asyncio.Protocol`s on raw TCP sockets replaying pre-encoded requests back to
back, one outstanding request per connection as Postfix's smtpd does. Each cell stops
after `--requests` requests or `--duration` seconds, whichever comes first. The CPU used
by the generators and by the server (all its processes, from /proc) is reported, so a
saturated generator or a shared core is visible in the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "policy.md"
POSTWARDEN = str(Path(sys.executable).with_name("postwarden"))
POSTGREY = "/usr/sbin/postgrey"
CONNECTIONS = (1, 32, 128)
CONNECTIONS_PER_GENERATOR = 64
START_TIMEOUT = 60.0  # seconds for a server to answer its first request
REPEAT_POOL = 2000  # distinct triplets replayed by the `repeat` scenario
REPEAT_DELAY = 1  # greylisting delay (s) in the `repeat` scenario
LIST_ENTRIES = 1_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the request stream ---------------------------------------------------------------------


def client_ip(n: int) -> str:
    """A distinct public-looking IPv4 address per n, spread over many /24 networks."""
    # Multiplying by an odd constant permutes 2**24, so addresses do not repeat within a
    # run and consecutive requests land in different /24s (no accidental grouping).
    x = (n * 2_654_435_761) % (1 << 24)
    return f"{20 + (n >> 24) % 60}.{x >> 16}.{(x >> 8) & 0xFF}.{x & 0xFF}"


def encode_request(
    *, n: int, ip: str, sender: str, recipient: str, client_name: str | None = None
) -> bytes:
    """Every attribute Postfix 3.7's smtpd sends with a RCPT-stage policy request."""
    name = client_name if client_name is not None else f"mx{n % 9973}.sender{n % 997}.example"
    if n % 10 == 0:
        name = "unknown"  # some clients have no (verified) reverse name
    queue_id = f"{(n * 40503) & 0xFFFFFFFFF:09X}"
    fields = (
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("helo_name", name if name != "unknown" else f"[{ip}]"),
        ("queue_id", queue_id),
        ("sender", sender),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("client_address", ip),
        ("client_name", name),
        ("reverse_client_name", name),
        ("instance", f"{n & 0xFFFF:x}.{(n >> 16) & 0xFFFF:x}.{n % 65521:x}.0"),
        ("sasl_method", ""),
        ("sasl_username", ""),
        ("sasl_sender", ""),
        ("size", str(2000 + n % 50000)),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", "TLSv1.3" if n % 2 else ""),
        ("encryption_cipher", "TLS_AES_256_GCM_SHA384" if n % 2 else ""),
        ("encryption_keysize", "256" if n % 2 else "0"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("client_port", str(1024 + n % 60000)),
        ("policy_context", ""),
        ("server_address", "192.0.2.25"),
        ("server_port", "25"),
    )
    return "".join(f"{k}={v}\n" for k, v in fields).encode() + b"\n"


def new_triplet_requests(tag: str, start: int, count: int) -> list[bytes]:
    """`count` requests whose triplets were never seen (unique sender per request)."""
    return [
        encode_request(
            n=n,
            ip=client_ip(n),
            sender=f"user{n}@{tag}.s{n % 997}.example",
            recipient=f"rcpt{n % 50}@dest.example",
        )
        for n in range(start, start + count)
    ]


def repeat_pool(tag: str) -> list[bytes]:
    """The `repeat` scenario's triplets: one per /24 (auto-whitelisting is per network)."""
    return [
        encode_request(
            n=n,
            ip=client_ip(n),
            sender=f"news{n}@{tag}.list{n % 97}.example",
            recipient=f"rcpt{n % 50}@dest.example",
        )
        for n in range(REPEAT_POOL)
    ]


def list_entries() -> tuple[list[str], list[str]]:
    """1,000,000 entries: forbidden IPs and domains, permitted mailboxes and networks."""
    quarter = LIST_ENTRIES // 4
    forbidden = [client_ip(1_000_000_000 + i) for i in range(quarter)]
    forbidden += [f"spam{i}.bad.example" for i in range(quarter)]
    permitted = [f"friend{i}@good.example" for i in range(quarter)]
    permitted += [f"{90 + (i >> 16)}.{(i >> 8) & 0xFF}.{i & 0xFF}.0/24" for i in range(quarter)]
    return forbidden, permitted


def list_requests(tag: str, count: int) -> list[bytes]:
    """3 in 4 requests hit an entry of `list_entries()`, the 4th misses every list."""
    quarter = LIST_ENTRIES // 4
    out = []
    for n in range(count):
        k = (n * 7919) % quarter
        kind = n % 4
        ip = client_ip(n)
        sender = f"user{n}@{tag}.s{n % 997}.example"
        if kind == 0:
            ip = client_ip(1_000_000_000 + k)  # forbidden IP
        elif kind == 1:
            sender = f"user{n}@spam{k}.bad.example"  # forbidden domain
        elif kind == 2:
            sender = f"friend{k}@good.example"  # permitted mailbox
        out.append(
            encode_request(n=n, ip=ip, sender=sender, recipient=f"rcpt{n % 50}@dest.example")
        )
    return out


# --- the load generator (runs in child processes) ----------------------------------------


class PolicyClient(asyncio.Protocol):
    """One keep-alive connection sending its requests back to back, timing each reply."""

    def __init__(self, requests: Sequence[bytes], latencies: list[float], actions: Counter[bytes]):
        self.requests = requests
        self.latencies = latencies
        self.actions = actions
        self.index = 0
        self.buffer = b""
        self.sent_at = 0.0
        self.deadline = 0.0
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def start(self, deadline: float) -> None:
        self.deadline = deadline
        if not self.requests:
            self.done.set_result(None)
            return
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.requests[0])

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not buffer.endswith(b"\n\n"):
            self.buffer = buffer
            return
        now = time.perf_counter()
        self.buffer = b""
        self.latencies.append(now - self.sent_at)
        # "action=DEFER_IF_PERMIT Greylisted…": count the verb only.
        space = buffer.find(b" ")
        self.actions[buffer[7 : space if space > 0 else len(buffer) - 2]] += 1
        self.index += 1
        if self.index >= len(self.requests) or now >= self.deadline:
            if not self.done.done():
                self.done.set_result(None)
            return
        assert self.transport is not None
        self.sent_at = now
        self.transport.write(self.requests[self.index])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"server closed after {self.index} replies"))


async def _generate(
    port: int, per_connection: list[list[bytes]], start_at: float, duration: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    actions: Counter[bytes] = Counter()
    clients = []
    for requests in per_connection:
        _, client = await loop.create_connection(
            functools.partial(PolicyClient, requests, latencies, actions), "127.0.0.1", port
        )
        clients.append(client)
    # Every generator process starts at the same wall-clock instant.
    await asyncio.sleep(max(0.0, start_at - time.time()))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for client in clients:
        client.start(t0 + duration)
    errors = []
    for client in clients:
        try:
            await client.done
        except ConnectionError as exc:
            errors.append(str(exc))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    return {
        "latencies": latencies,
        "actions": {k.decode(errors="replace"): v for k, v in actions.items()},
        "elapsed": elapsed,
        "cpu": cpu,
        "errors": errors,
    }


def _generator_main(
    pipe: multiprocessing.connection.Connection,
    port: int,
    per_connection: list[list[bytes]],
    start_at: float,
    duration: float,
) -> None:
    try:
        result = asyncio.run(_generate(port, per_connection, start_at, duration))
    except Exception as exc:  # noqa: BLE001  # any failure is reported by the parent
        result = {"fatal": f"{type(exc).__name__}: {exc}"}
    pipe.send(result)
    pipe.close()


@dataclasses.dataclass
class CellResult:
    connections: int
    requests: int
    elapsed: float
    p50_ms: float
    p99_ms: float
    generator_cpu: float  # seconds, all generator processes
    generators: int
    server_cpu: float  # seconds, all server processes
    server_wait: float  # seconds server processes were runnable but had no CPU
    other_cpu: float  # seconds used by everything else on the machine during the cell
    actions: Counter[str]
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def run_cell(
    port: int,
    requests: Sequence[bytes],
    connections: int,
    duration: float,
    server_pids: Sequence[int],
) -> CellResult:
    """Drive the server with `requests` split over `connections` keep-alive connections."""
    per_connection = [list(requests[i::connections]) for i in range(connections)]
    generators = max(1, -(-connections // CONNECTIONS_PER_GENERATOR))
    ctx = multiprocessing.get_context("fork")
    start_at = time.time() + 0.5 + 0.01 * connections
    children = []
    for g in range(generators):
        parent_end, child_end = ctx.Pipe(duplex=False)
        share = per_connection[g::generators]
        proc = ctx.Process(
            target=_generator_main, args=(child_end, port, share, start_at, duration)
        )
        proc.start()
        child_end.close()
        children.append((proc, parent_end))
    time.sleep(max(0.0, start_at - time.time()))
    server_cpu0, server_wait0 = process_tree_cpu(server_pids)
    busy0 = machine_busy_cpu()
    results = []
    for proc, pipe in children:
        if pipe.poll(duration + 60):
            results.append(pipe.recv())
        else:
            results.append({"fatal": "generator did not report in time"})
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    server_cpu, server_wait = process_tree_cpu(server_pids)
    server_cpu -= server_cpu0
    server_wait -= server_wait0
    busy = machine_busy_cpu() - busy0
    fatal = [r["fatal"] for r in results if "fatal" in r]
    if fatal:
        raise RuntimeError("; ".join(fatal))
    latencies = sorted(x for r in results for x in r["latencies"])
    actions: Counter[str] = Counter()
    for r in results:
        actions.update(r["actions"])
    return CellResult(
        connections=connections,
        requests=len(latencies),
        elapsed=max(r["elapsed"] for r in results),
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        generator_cpu=sum(r["cpu"] for r in results),
        generators=generators,
        server_cpu=server_cpu,
        server_wait=server_wait,
        other_cpu=max(0.0, busy - server_cpu - sum(r["cpu"] for r in results)),
        actions=actions,
        errors=[e for r in results for e in r["errors"]],
    )


# --- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine_busy_cpu() -> float:
    """CPU seconds all cores spent busy so far (from /proc/stat; idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def process_tree_cpu(roots: Sequence[int]) -> tuple[float, float]:
    """CPU seconds used by `roots` and their live descendants, and seconds they spent
    runnable but waiting for a CPU (from /proc: a busy machine shows in the second)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    waits: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        with contextlib.suppress(OSError, IndexError, ValueError):
            waits[pid] = int(Path(f"/proc/{entry}/schedstat").read_text().split()[1]) / 1e9
    wanted = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    return (
        sum(times.get(pid, 0.0) for pid in wanted),
        sum(waits.get(pid, 0.0) for pid in wanted),
    )


def wait_until_answering(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    probe = encode_request(
        n=1, ip="192.0.2.1", sender="probe@probe.example", recipient="p@x.example"
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(probe)
                reply = b""
                while not reply.endswith(b"\n\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                if reply.startswith(b"action="):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not answer within {START_TIMEOUT}s:\n{log.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def postgrey_server(workdir: Path, delay: int) -> Iterator[tuple[int, list[int]]]:
    """postgrey in the foreground (log to a file, no syslog), its own dbdir."""
    dbdir = workdir / "postgrey-db"
    dbdir.mkdir()
    user = []
    if os.geteuid() == 0:
        shutil.chown(dbdir, "postgrey", "postgrey")
        user = ["--user=postgrey", "--group=postgrey"]
    port = free_port()
    log = workdir / "postgrey.log"
    cmd = [
        POSTGREY,
        f"--inet=127.0.0.1:{port}",
        f"--dbdir={dbdir}",
        f"--delay={delay}",
        f"--pidfile={workdir / 'postgrey.pid'}",
        "--listen-queue-size=512",
        *user,
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_answering(port, process, log)
        yield port, [process.pid]
    finally:
        stop_process(process)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    log = workdir / "redis.log"
    cmd = [
        "redis-server",
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--logfile", str(log),
    ]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(process)


def policyd_config(
    workdir: Path, port: int, store_url: str, workers: int, greylisting: dict[str, Any]
) -> Path:
    lines = [
        "[store]",
        f'url = "{store_url}"',
        "[policyd]",
        f'listen = ["inet:127.0.0.1:{port}"]',
        f"workers = {workers}",
        "max_connections = 2000",
        "[greylisting]",
        *(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in greylisting.items()),
    ]
    path = workdir / "postwarden.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def policyd_server(config: Path, workdir: Path) -> Iterator[tuple[int, list[int]]]:
    port = int(config.read_text().split("inet:127.0.0.1:")[1].split('"')[0])
    log = workdir / "policyd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [POSTWARDEN, "--config", str(config), "policyd"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        wait_until_answering(port, process, log)
        yield port, [process.pid]
    finally:
        stop_process(process)


def import_lists(config: Path, workdir: Path) -> float:
    """Load LIST_ENTRIES entries with the CLI, as an operator would; returns seconds taken."""
    forbidden, permitted = list_entries()
    t0 = time.monotonic()
    for name, entries in (("forbidden", forbidden), ("permitted", permitted)):
        path = workdir / f"{name}.txt"
        path.write_text("\n".join(entries) + "\n")
        subprocess.run(
            [POSTWARDEN, "--config", str(config), "lists", "import", name, str(path)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return time.monotonic() - t0


# --- scenarios ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    scenario: str
    server: str
    store: str
    workers: str
    cell: CellResult
    baseline: float | None = None  # postgrey req/s at the same connections


def describe_actions(actions: Counter[str]) -> str:
    total = sum(actions.values()) or 1
    return ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in actions.most_common(3))


@dataclasses.dataclass
class Contender:
    """One server in one scenario: how to start it and which requests each cell sends."""

    label: str  # "postgrey" or "policyd w=N"
    server: str
    store: str
    workers: str
    start: Callable[[], contextlib.AbstractContextManager[tuple[int, list[int]]]]
    stream: Sequence[bytes]
    new_slices: bool  # True: every cell gets requests never sent before
    prime: Sequence[bytes] = ()  # sent once, unmeasured, after the server starts
    prime_wait: float = 0.0
    offset: int = 0


def print_cell(label: str, cell: CellResult) -> None:
    print(
        f"  {label:<28} conns {cell.connections:>3}: {cell.rate:8.0f} req/s  "
        f"p50 {cell.p50_ms:6.2f} ms  p99 {cell.p99_ms:7.2f} ms  "
        f"server CPU {1e6 * cell.server_cpu / max(cell.requests, 1):6.0f} us/req  "
        f"waited {1e6 * cell.server_wait / max(cell.requests, 1):5.0f} us/req  "
        f"other {cell.other_cpu / cell.elapsed:4.2f} cores  "
        f"[{describe_actions(cell.actions)}]"
        + (f" ERRORS {cell.errors[:3]}" if cell.errors else ""),
        flush=True,
    )


def run_scenario(
    scenario: str, contenders: Sequence[Contender], args: argparse.Namespace
) -> dict[tuple[str, int], CellResult]:
    """All contenders up at once; cells interleaved round by round; median rate kept.

    Interleaving puts every contender through the same moments of machine noise, and the
    median of `--rounds` cells per (server, connections) discards one-off disturbances.
    """
    kept: dict[tuple[str, int], CellResult] = {}
    with contextlib.ExitStack() as stack:
        running = []
        for contender in contenders:
            port, pids = stack.enter_context(contender.start())
            if contender.prime:
                run_cell(port, contender.prime, 8, 120.0, [])
            running.append((contender, port, pids))
        time.sleep(max((c.prime_wait for c in contenders), default=0.0))
        for contender, port, _ in running:
            if contender.prime:
                # The first pass after the delay (PREPEND X-Greylist) is also unmeasured:
                # every measured request is a triplet that already passed.
                run_cell(port, contender.prime, 8, 120.0, [])
        for connections in args.connections:
            cells: dict[str, list[CellResult]] = {}
            for round_no in range(args.rounds):
                for contender, port, pids in running:
                    requests = contender.stream[contender.offset : contender.offset + args.requests]
                    if contender.new_slices:
                        contender.offset += args.requests
                    cell = run_cell(port, requests, connections, args.duration, pids)
                    cells.setdefault(contender.label, []).append(cell)
                    print_cell(f"{scenario} {contender.label} #{round_no + 1}", cell)
            for label, results in cells.items():
                kept[(label, connections)] = sorted(results, key=lambda c: c.rate)[
                    len(results) // 2
                ]
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30_000, help="requests per cell (max)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell (max)")
    parser.add_argument("--rounds", type=int, default=3, help="cells per point (median kept)")
    parser.add_argument(
        "--connections", type=lambda s: [int(x) for x in s.split(",")], default=list(CONNECTIONS)
    )
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[0, 1],
        help="policyd workers settings (0 = one per core): all in `new`, the first elsewhere",
    )
    parser.add_argument(
        "--scenarios", default="new,repeat,redis,lists", help="comma-separated subset"
    )
    parser.add_argument("--no-postgrey", action="store_true", help="skip postgrey cells")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    # Enough never-seen triplets for every cell of every round.
    total = args.requests * len(args.connections) * args.rounds

    def workers_text(workers: int) -> str:
        return f"0 = {os.cpu_count()} procs" if workers == 0 else str(workers)

    header = machine_header(args)
    print(header, flush=True)
    rows: list[Row] = []
    baseline: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="policy-bench-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # noqa: S103  # postgrey drops to its own user and must reach its dbdir

        def workdir(name: str) -> Path:
            path = root / name
            path.mkdir()
            os.chmod(path, 0o755)  # noqa: S103
            return path

        def postgrey(name: str, delay: int, stream: Sequence[bytes], new: bool) -> Contender:
            return Contender(
                "postgrey",
                "postgrey " + postgrey_version(),
                "BerkeleyDB",
                "1 process",
                lambda: postgrey_server(workdir(name), delay),
                stream,
                new,
            )

        def policyd(
            name: str,
            store: str,
            greylisting: dict[str, Any],
            stream: Sequence[bytes],
            new: bool,
            redis: bool = False,
            lists: bool = False,
            workers: int = args.workers[0],
        ) -> Contender:
            @contextlib.contextmanager
            def start() -> Iterator[tuple[int, list[int]]]:
                wd = workdir(name)
                with contextlib.ExitStack() as stack:
                    url = (
                        stack.enter_context(redis_server(wd))
                        if redis
                        else f"sqlite:///{wd}/state.db"
                    )
                    cfg = policyd_config(wd, free_port(), url, workers, greylisting)
                    if lists:
                        seconds = import_lists(cfg, wd)
                        print(
                            f"  imported {LIST_ENTRIES:,} entries with the CLI in {seconds:.1f} s"
                        )
                    yield stack.enter_context(policyd_server(cfg, wd))

            label = f"policyd w={workers}"
            return Contender(label, "policyd", store, workers_text(workers), start, stream, new)

        def add_rows(scenario: str, contenders: Sequence[Contender], base: bool) -> None:
            kept = run_scenario(scenario, contenders, args)
            for c in contenders:
                for connections in args.connections:
                    cell = kept[(c.label, connections)]
                    if c.label == "postgrey" and scenario == "new":
                        baseline[connections] = cell.rate
                    rows.append(Row(scenario, c.server, c.store, c.workers, cell, None))
            for row in rows:
                if row.baseline is None:
                    ref = kept.get(("postgrey", row.cell.connections)) if base else None
                    rate = ref.rate if ref else baseline.get(row.cell.connections)
                    row.baseline = rate

        if "new" in scenarios:
            pg_stream = new_triplet_requests("pg", 0, total)
            contenders = [
                policyd(
                    f"pw-new-{w}",
                    "SQLite",
                    {"delay": 300},
                    new_triplet_requests(f"pw{w}", 0, total),
                    True,
                    workers=w,
                )
                for w in args.workers
            ]
            if not args.no_postgrey:
                contenders.insert(0, postgrey("pg-new", 300, pg_stream, True))
            add_rows("new", contenders, True)

        if "repeat" in scenarios:
            pool = repeat_pool("rep")
            stream = [pool[i % len(pool)] for i in range(args.requests)]
            contenders = [policyd("pw-rep", "SQLite", {"delay": REPEAT_DELAY}, stream, False)]
            if not args.no_postgrey:
                contenders.insert(0, postgrey("pg-rep", REPEAT_DELAY, stream, False))
            for c in contenders:
                c.prime, c.prime_wait = pool, REPEAT_DELAY + 1.0
            add_rows("repeat", contenders, True)

        if "redis" in scenarios:
            stream = new_triplet_requests("redis", 0, total)
            add_rows(
                "new",
                [policyd("pw-redis", "Redis", {"delay": 300}, stream, True, redis=True)],
                False,
            )

        if "lists" in scenarios:
            stream = list_requests("lists", args.requests)
            add_rows(
                "lists",
                [
                    policyd(
                        "pw-lists",
                        "SQLite + 1M list entries",
                        {"enabled": False},
                        stream,
                        False,
                        lists=True,
                    )
                ],
                False,
            )

    table = render_table(rows)
    text = header + "\n\n" + table + "\n" + LEGEND
    print("\n" + table + "\n" + LEGEND)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"written to {args.output}")
    return 0


LEGEND = """\
Scenarios: `new` = greylisting on (delay 300 s), every triplet new (store miss + insert,
DEFER); `repeat` = 2,000 triplets that already passed greylisting (store hit + update,
DUNNO; a network is auto-whitelisted after 5 passes, then lookups only); `lists` =
greylisting off, 1,000,000 permitted/forbidden entries, 3 of 4 requests hit one.
Ratio: to postgrey at the same connection count (postgrey `new` for the Redis and lists
rows). Server CPU: all server processes, per request. Generator CPU: load-generator
processes, as a share of one core over the cell. Other CPU: cores busy with unrelated
processes during the cell; server waited for a CPU: time its processes were runnable
but not running (from /proc/PID/schedstat) - on a shared machine this, not the server's
code, makes most of the p99.
"""


def render_table(rows: Sequence[Row]) -> str:
    lines = [
        "| scenario | server | store | workers | conns | requests | req/s | p50 ms | p99 ms "
        "| ratio to postgrey | server CPU µs/req | server waited for a CPU µs/req "
        "| generator CPU | other CPU | replies |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        c = row.cell
        base = row.baseline
        ratio = f"{c.rate / base:.2f}x" if base else "n/a"
        lines.append(
            f"| {row.scenario} | {row.server} | {row.store} | {row.workers} | {c.connections} "
            f"| {c.requests} | {c.rate:.0f} | {c.p50_ms:.2f} | {c.p99_ms:.2f} | {ratio} "
            f"| {1e6 * c.server_cpu / max(c.requests, 1):.0f} "
            f"| {1e6 * c.server_wait / max(c.requests, 1):.0f} "
            f"| {100 * c.generator_cpu / c.elapsed:.0f}% of a core ({c.generators} proc) "
            f"| {c.other_cpu / c.elapsed:.2f} cores "
            f"| {describe_actions(c.actions)} |"
        )
    return "\n".join(lines) + "\n"


def postgrey_version() -> str:
    try:
        out = subprocess.run([POSTGREY, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.split()[1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine_header(args: argparse.Namespace) -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    redis_v = next((w[2:] for w in redis.split() if w.startswith("v=")), "?")
    try:
        pw = importlib.metadata.version("postwarden")
    except importlib.metadata.PackageNotFoundError:
        pw = "?"
    workers = ", ".join(f"{w} (one per core)" if w == 0 else str(w) for w in args.workers)
    return "\n".join(
        [
            "# Policy server benchmark",
            "",
            f"- machine: nproc {os.cpu_count()}, {cpu}, Linux {platform.release()}",
            f"- versions: postwarden {pw}, Python {platform.python_version()}, "
            f"SQLite {sqlite3.sqlite_version}, postgrey {postgrey_version()} (Perl), "
            f"Redis {redis_v}",
            f"- per cell: at most {args.requests} requests or {args.duration:.0f} s; "
            f"connections {', '.join(map(str, args.connections))} (keep-alive, back to back); "
            f"{args.rounds} rounds interleaved between servers, median kept; "
            f"policyd workers: `new` runs {workers}; the other scenarios {args.workers[0]}",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"load average at start {os.getloadavg()[0]:.2f}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
