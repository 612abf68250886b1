"""Store benchmark (not a test): greylist lookup + update per request, as policyd does.

    python bench/store_bench.py [--requests 20000] [--redis-url redis://127.0.0.1:6379/0]

Without --redis-url a private redis-server is started on a free loopback port (and
stopped). Prints requests/s, p50/p99 latency and this process's CPU time of one lookup
+ one update, for SQLite and Redis, with every triplet new and with repeated triplets.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from postwarden.store import ClientNetworkRecord, Store, StoreError, TripletRecord, open_store


@dataclass(frozen=True)
class Result:
    rate: float  # requests/s
    p50_ms: float
    p99_ms: float
    cpu_us: float  # this process's CPU per request (leaves out redis-server's share)
    failures: int  # StoreError answers (policyd would answer its default)


async def run(store: Store, requests: int, distinct: int) -> Result:
    """`requests` greylist lookups + updates over `distinct` triplets, as policyd does them.

    CPU time per request is robust on a busy machine, where wall-clock rates are not.
    """
    latencies: list[float] = []
    failures = 0
    cpu_started = time.process_time()
    started = time.perf_counter()
    for i in range(requests):
        n = i % distinct
        network = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.0/24"
        triplet = f"{network}|sender{n}@example.net|rcpt@example.com"
        t0 = time.perf_counter()
        try:
            record, network_record = await store.greylist_lookup(triplet, network)
            now = time.time()
            if record is None:
                record = TripletRecord(now, now)
            else:
                record = TripletRecord(record.first_seen, now, record.passes + 1)
            passes = 0 if network_record is None else network_record.passes
            await store.greylist_update(
                triplet, record, network, ClientNetworkRecord(passes, now), ttl=3600
            )
        except StoreError:
            failures += 1
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    cpu = (time.process_time() - cpu_started) / requests * 1e6
    quantiles = statistics.quantiles(latencies, n=100)
    return Result(requests / elapsed, quantiles[49] * 1000, quantiles[98] * 1000, cpu, failures)


@contextmanager
def private_redis() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not on PATH (apt-get install redis-server), or pass --redis-url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", directory]
        process = subprocess.Popen(
            [*argv, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


async def bench(url: str, label: str, requests: int) -> None:
    for name, distinct in (("every triplet new", requests), ("repeated triplets", 100)):
        store = open_store(url)
        try:
            r = await run(store, requests, distinct)
        finally:
            await store.close()
        print(
            f"{label:7} {name:18} {r.rate:9.0f} req/s   p50 {r.p50_ms:6.3f} ms"
            f"   p99 {r.p99_ms:6.3f} ms   cpu {r.cpu_us:5.0f} µs/req   failures {r.failures}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(bench(f"sqlite://{Path(directory)}/bench.db", "sqlite", args.requests))
    if args.redis_url:
        asyncio.run(bench(args.redis_url, "redis", args.requests))
    else:
        with private_redis() as url:
            asyncio.run(bench(url, "redis", args.requests))


if __name__ == "__main__":
    main()
