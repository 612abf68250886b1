"""policyd with DNSBL on against the real NSD: a broken list, SERVFAIL and a silent server.

What the operator sees: a list that lists 127.0.0.1 refuses nobody and is named in one
ERROR line; a zone that SERVFAILs or a nameserver that never answers costs at most
`dnsbl.budget` and lets the request go on to the next step.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.dns_server import DNSBL_ZONE, SERVFAIL_ZONE, WILDCARD_ZONE, DnsServer
from tests.fixtures.policyd_daemon import StartPolicyd
from tests.integration.policyd.policy_client import DEFER, DUNNO, open_client, request

BUDGET = 0.5
BOUND_MARGIN = 3.0  # generous: only "answered before budget + this" is asserted


@pytest.mark.expect_log(rf"{WILDCARD_ZONE} lists 127\.0\.0\.1")
async def test_a_wildcard_list_refuses_nobody_and_is_named_once(
    policyd_daemon: StartPolicyd, dns_server: DnsServer
) -> None:
    daemon = policyd_daemon(
        {
            "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0},
            "dnsbl": {"enabled": True, "zones": [{"zone": WILDCARD_ZONE}, {"zone": DNSBL_ZONE}]},
            "greylisting": {"enabled": False},
        }
    )
    reader, writer = await open_client(daemon)
    try:
        for n in range(1, 11):
            writer.write(request(client_address=f"203.0.113.{n}", instance=f"w.{n}"))
            await writer.drain()
            assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 5.0) == DUNNO
        # The working list beside it still refuses its listed client.
        writer.write(request(client_address="192.0.2.1", instance="w.listed"))
        await writer.drain()
        listed = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5.0)
        assert (
            listed == f"action=554 5.7.1 Client host blocked using DNSBL: {DNSBL_ZONE}\n\n".encode()
        )
    finally:
        writer.close()
    logs = daemon.wait_for_log("instance=w.listed")
    assert logs.count(f"{WILDCARD_ZONE} lists 127.0.0.1") == 1
    assert " ERROR " in next(line for line in logs.splitlines() if "lists 127.0.0.1" in line)


@pytest.mark.parametrize("trouble", ["servfail", "silent"])
async def test_dns_trouble_is_answered_within_the_budget_as_not_listed(
    policyd_daemon: StartPolicyd, dns_server: DnsServer, trouble: str
) -> None:
    nameserver = dns_server.nameserver if trouble == "servfail" else dns_server.blackhole_nameserver
    daemon = policyd_daemon(
        {
            # dns.timeout longer than the budget: the budget must end the wait.
            "dns": {"nameservers": [nameserver], "timeout": 10.0},
            "dnsbl": {
                "enabled": True,
                "zones": [{"zone": SERVFAIL_ZONE, "weight": 5}],
                "budget": BUDGET,
            },
        }
    )
    reader, writer = await open_client(daemon)
    try:
        for n in range(1, 4):
            writer.write(request(client_address=f"198.51.100.{n}", instance=f"{trouble}.{n}"))
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\n\n"), BUDGET + BOUND_MARGIN)
            # Not listed: the order goes on to greylisting, which defers a new triplet.
            assert answer == DEFER
    finally:
        writer.close()
    logs = daemon.wait_for_log(f"instance={trouble}.3")
    assert logs.count("rule=greylist_defer") == 3
