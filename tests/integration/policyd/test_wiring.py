"""What policyd wires from the config: the store, real DNS for DNSBL and SPF."""

from __future__ import annotations

import asyncio
import time

import pytest

from postwarden.store import open_store
from tests.fixtures.dns_server import DNSBL_ZONE, SPF_ZONE, DnsServer
from tests.fixtures.policyd_daemon import (
    StartPolicyd,
    free_tcp_port,
)
from tests.integration.policyd.policy_client import (
    DEFER,
    DUNNO,
    ask_once,
    request,
)


async def test_greylist_state_lives_in_the_sqlite_store(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon()
    assert daemon.store_url.startswith("sqlite://")
    assert await ask_once(daemon, request(recipient="kept@example.com")) == DEFER
    store = open_store(daemon.store_url)
    # The daemon commits greylist writes in batches every few ms (write-behind).
    deadline = time.monotonic() + 2.0
    try:
        while True:
            triplets = await store.greylist_triplets()
            if any("kept@example.com" in key for key, _ in triplets):
                break
            assert time.monotonic() < deadline, triplets
            await asyncio.sleep(0.01)
    finally:
        await store.close()


async def test_dnsbl_listing_and_spf_results_come_from_real_dns(
    policyd_daemon: StartPolicyd, dns_server: DnsServer
) -> None:
    daemon = policyd_daemon(
        {
            "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0},
            "dnsbl": {"enabled": True, "zones": [{"zone": DNSBL_ZONE}]},
            "spf": {"enabled": True, "fail_action": "reject"},
            "greylisting": {"enabled": False},
        }
    )
    listed = await ask_once(daemon, request(client_address="192.0.2.1"))
    assert listed.startswith(b"action=554 5.7.1 ") and DNSBL_ZONE.encode() in listed
    passed = await ask_once(
        daemon, request(client_address="192.0.2.10", sender=f"a@pass.{SPF_ZONE}")
    )
    assert passed.startswith(b"action=PREPEND Received-SPF: pass ")
    failed = await ask_once(
        daemon, request(client_address="192.0.2.99", sender=f"a@pass.{SPF_ZONE}")
    )
    assert failed.startswith(b"action=550 5.7.23 ")


@pytest.mark.expect_log(r"store failure, answering the default action")
async def test_unreachable_store_answers_the_default_and_logs_once(
    policyd_daemon: StartPolicyd,
) -> None:
    dead = free_tcp_port()  # nothing listens there
    daemon = policyd_daemon({"store": {"url": f"redis://127.0.0.1:{dead}/0", "timeout": 0.3}})
    for i in range(5):
        assert await ask_once(daemon, request(recipient=f"d{i}@example.com")) == DUNNO
    logs = daemon.wait_for_log("rule=default")
    assert logs.count("store failure, answering the default action") == 1
    assert logs.count("rule=default") == 5
    assert "Traceback" not in logs
