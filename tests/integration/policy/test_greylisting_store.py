"""Greylisting through the real SQLite store on one fake clock: the store's TTL and
`greylisting.decide` forget a triplet and a client network at the same instant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from postwarden.config.model import GreylistingConfig
from postwarden.policy.greylisting import client_network, decide, triplet_key
from postwarden.policy.records import ClientNetworkRecord, TripletRecord
from postwarden.policy.verdict import Rule
from postwarden.store.sqlite import SqliteStore

T0 = 1_700_000_000.0
CFG = GreylistingConfig(
    delay=300, retry_window=1000, expiry=5000, auto_whitelist_after=1, add_header=False
)
NETWORK = client_network("192.0.2.10")
TRIPLET = triplet_key(NETWORK, "alice@example.org", "bob@example.com")


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clock_and_store(tmp_path: Path) -> AsyncIterator[tuple[FakeClock, SqliteStore]]:
    clock = FakeClock()
    store = SqliteStore(tmp_path / "state.db", clock=clock)
    try:
        yield clock, store
    finally:
        await store.close()


async def attempt(clock: FakeClock, store: SqliteStore, now: float, triplet: str = TRIPLET) -> Rule:
    """One delivery attempt as the pipeline makes it: look up, decide, write with ttl=expiry."""
    clock.now = now
    record, network = await store.greylist_lookup(triplet, NETWORK)
    decision = decide(record, network, now, CFG, exempt=False)
    await store.greylist_update(
        triplet, decision.triplet_record, NETWORK, decision.network_record, CFG.expiry
    )
    return decision.verdict.rule


async def test_store_and_decision_agree_at_every_boundary(
    clock_and_store: tuple[FakeClock, SqliteStore],
) -> None:
    clock, store = clock_and_store
    assert await attempt(clock, store, T0) is Rule.GREYLIST_DEFER
    assert await attempt(clock, store, T0 + 299.5) is Rule.GREYLIST_DEFER  # early
    assert await attempt(clock, store, T0 + 300) is Rule.GREYLIST_PASS  # at the delay
    passed_at = T0 + 300
    # Just before expiry the store still has both records, and decide still knows them.
    clock.now = passed_at + 4999.5
    record, network = await store.greylist_lookup(TRIPLET, NETWORK)
    assert record == TripletRecord(T0, passed_at, 1)
    assert network == ClientNetworkRecord(1, passed_at)
    still_known = decide(record, network, clock.now, CFG, exempt=False)
    assert still_known.verdict.rule is Rule.GREYLIST_KNOWN
    # At expiry the store's TTL has run out; decide, given the records it was last handed,
    # must come to the same answer rather than call the triplet or the network known.
    at_expiry = passed_at + CFG.expiry
    clock.now = at_expiry
    assert await store.greylist_lookup(TRIPLET, NETWORK) == (None, None)
    forgotten_triplet = decide(record, None, at_expiry, CFG, exempt=False)
    forgotten_network = decide(None, network, at_expiry, CFG, exempt=False)
    assert forgotten_triplet.verdict.rule is Rule.GREYLIST_DEFER
    assert forgotten_network.verdict.rule is Rule.GREYLIST_DEFER
    assert await attempt(clock, store, at_expiry) is Rule.GREYLIST_DEFER


async def test_a_network_whitelisted_through_the_store_lapses_at_expiry(
    clock_and_store: tuple[FakeClock, SqliteStore],
) -> None:
    clock, store = clock_and_store
    await attempt(clock, store, T0)
    assert await attempt(clock, store, T0 + 300) is Rule.GREYLIST_PASS
    other = triplet_key(NETWORK, "carol@example.org", "bob@example.com")
    # auto_whitelist_after = 1: a new triplet of that network is known at once ...
    assert await attempt(clock, store, T0 + 300 + 4999.5, other) is Rule.GREYLIST_KNOWN
    # ... and that pass rewrote the network's last_seen (older than the touch interval),
    # so it lasts another expiry from there, not from the first pass.
    touched_again = T0 + 300 + 4999.5 + 4999.5
    assert await attempt(clock, store, touched_again, other) is Rule.GREYLIST_KNOWN
    lapsed = touched_again + CFG.expiry
    third = triplet_key(NETWORK, "dave@example.org", "bob@example.com")
    assert await attempt(clock, store, lapsed, third) is Rule.GREYLIST_DEFER
