"""How long one DNSBL check takes against a real NSD: SERVFAIL, NXDOMAIN, a wildcard
(broken) list, and a nameserver that never answers, for three `dnsbl.budget` values.

Not a test: figures for the README's Reliability section. A fresh checker per lookup, so
nothing is cached and the 127.0.0.1 probe is always due (the worst case: two queries).
Run: `.venv/bin/python bench/dnsbl_timing.py` (needs nsd; binds 127.0.0.53-79).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postwarden.config.model import DnsblConfig, DnsblZone, DnsConfig
from postwarden.dns.resolver import make_resolver
from postwarden.policy.dnsbl import DnsblChecker
from tests.fixtures.dns_server import (
    DEFAULT_ZONES,
    DNSBL_ZONE,
    SERVFAIL_ZONE,
    WILDCARD_ZONE,
    DnsServer,
)


async def measure(server: DnsServer) -> None:
    cases = [
        ("servfail", server.nameserver, SERVFAIL_ZONE),
        ("nxdomain", server.nameserver, DNSBL_ZONE),
        ("wildcard", server.nameserver, WILDCARD_ZONE),
        ("silent", server.blackhole_nameserver, DNSBL_ZONE),
    ]
    for budget in (0.3, 1.0, 2.0):
        for name, nameserver, zone in cases:
            times = []
            for i in range(10 if name == "silent" else 50):
                checker = DnsblChecker(
                    DnsblConfig(enabled=True, zones=[DnsblZone(zone=zone)], budget=budget),
                    make_resolver(DnsConfig(nameservers=[nameserver], timeout=10.0)),
                )
                started = time.perf_counter()
                result = await checker.check(f"203.0.113.{i + 1}")
                times.append((time.perf_counter() - started) * 1000)
                assert result.score == 0, (name, result)
            times.sort()
            print(
                f"budget={budget:<4} {name:9} n={len(times):3} "
                f"median={statistics.median(times):8.1f} ms  max={times[-1]:8.1f} ms"
            )


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        server = DnsServer(Path(directory))
        server.start(DEFAULT_ZONES)
        try:
            asyncio.run(measure(server))
        finally:
            server.close()


if __name__ == "__main__":
    main()
