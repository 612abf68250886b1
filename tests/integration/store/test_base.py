"""One contract, two real backends: every Store behaviour tested on SQLite and on Redis.

The SQLite store runs on a file in tmp_path with a fake clock; the Redis store on the
redis-server the fixture starts, plain, as a one-node Cluster and behind a Sentinel
(Redis TTLs are real time, so the one expiry test sleeps once, on plain Redis only).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from postwarden.store import (
    ClientNetworkRecord,
    ListChange,
    ListEntry,
    Store,
    TripletRecord,
)
from postwarden.store.sqlite import FLUSH_INTERVAL
from tests.integration.store.conftest import (
    NETWORK,
    T0,
    TRIPLET,
    Backend,
    F,
    FailingSequence,
    P,
    entries,
)


# --- lists ------------------------------------------------------------------------------
async def test_empty_store_has_no_entries_and_version_zero(store: Store) -> None:
    assert await store.list_entries() == []
    assert await store.lists_version() == 0
    assert await store.list_changes_since(0) == (0, [])


async def test_add_returns_new_count_and_lists_sort_by_list_then_entry(store: Store) -> None:
    added = await store.add_list_entries(
        [
            ListEntry(P, "example.com", "partner"),
            ListEntry(F, "192.0.2.0/24"),
            ListEntry(P, "10.0.0.1"),
            ListEntry(F, ".spam.test", "whole domain"),
        ]
    )
    assert added == 4
    assert await store.list_entries() == [
        ListEntry(F, ".spam.test", "whole domain"),
        ListEntry(F, "192.0.2.0/24"),
        ListEntry(P, "10.0.0.1"),
        ListEntry(P, "example.com", "partner"),
    ]
    assert await store.list_entries(P) == [
        ListEntry(P, "10.0.0.1"),
        ListEntry(P, "example.com", "partner"),
    ]
    assert await store.list_entries(F) == [
        ListEntry(F, ".spam.test", "whole domain"),
        ListEntry(F, "192.0.2.0/24"),
    ]


async def test_same_entry_in_both_lists_is_two_entries(store: Store) -> None:
    assert await store.add_list_entries(entries(P, "a.test") + entries(F, "a.test")) == 2
    assert await store.list_entries() == entries(F, "a.test") + entries(P, "a.test")


async def test_readd_updates_comment_without_a_change(store: Store) -> None:
    await store.add_list_entries(entries(P, "a.test", "b.test", comment="old"))
    version = await store.lists_version()
    assert await store.add_list_entries(entries(P, "a.test", comment="new")) == 0
    assert await store.lists_version() == version
    assert await store.list_changes_since(version) == (version, [])
    assert await store.list_entries(P) == [
        ListEntry(P, "a.test", "new"),
        ListEntry(P, "b.test", "old"),
    ]


async def test_duplicate_inside_one_batch_counts_once(store: Store) -> None:
    added = await store.add_list_entries(
        [ListEntry(P, "a.test", "first"), ListEntry(P, "a.test", "second")]
    )
    assert added == 1
    assert await store.lists_version() == 1
    assert await store.list_entries() == [ListEntry(P, "a.test", "second")]


async def test_remove_counts_only_existing_entries_of_that_list(store: Store) -> None:
    await store.add_list_entries(entries(P, "a.test", "b.test") + entries(F, "a.test"))
    assert await store.remove_list_entries(P, ["a.test", "missing.test"]) == 1
    assert await store.list_entries() == entries(F, "a.test") + entries(P, "b.test")
    assert await store.remove_list_entries(P, ["a.test"]) == 0
    assert await store.remove_list_entries(F, []) == 0


async def test_change_log_records_adds_and_removes_in_order(store: Store) -> None:
    await store.add_list_entries([ListEntry(P, "a.test", "why a"), ListEntry(F, "b.test")])
    await store.remove_list_entries(P, ["a.test"])
    await store.add_list_entries(entries(P, "c.test"))
    assert await store.lists_version() == 4
    assert await store.list_changes_since(0) == (
        4,
        [
            ListChange(1, "add", ListEntry(P, "a.test", "why a")),
            ListChange(2, "add", ListEntry(F, "b.test")),
            ListChange(3, "remove", ListEntry(P, "a.test", "why a")),
            ListChange(4, "add", ListEntry(P, "c.test")),
        ],
    )
    assert await store.list_changes_since(2) == (
        4,
        [
            ListChange(3, "remove", ListEntry(P, "a.test", "why a")),
            ListChange(4, "add", ListEntry(P, "c.test")),
        ],
    )
    assert await store.list_changes_since(4) == (4, [])


async def test_changes_since_is_none_once_the_log_no_longer_reaches_back(
    backend: Backend,
) -> None:
    store = backend.open(change_log_limit=3)
    for name in ("a", "b", "c", "d", "e"):
        await store.add_list_entries(entries(P, f"{name}.test"))
    assert await store.lists_version() == 5
    # The newest 3 changes (3, 4, 5) are kept: a reader at seq 2 can catch up...
    result = await store.list_changes_since(2)
    assert result is not None
    assert [change.seq for change in result[1]] == [3, 4, 5]
    # ...a reader at 1 or 0 missed change 2 and must reload everything.
    assert await store.list_changes_since(1) is None
    assert await store.list_changes_since(0) is None
    # A seq from the future means the store was replaced: reload too.
    assert await store.list_changes_since(99) is None
    assert len(await store.list_entries()) == 5


async def test_batch_larger_than_the_change_log_keeps_only_its_newest_changes(
    backend: Backend,
) -> None:
    store = backend.open(change_log_limit=3)
    await store.add_list_entries(entries(P, "old1.test", "old2.test"))
    assert await store.add_list_entries(entries(F, *(f"n{i}.test" for i in range(5)))) == 5
    assert await store.lists_version() == 7
    result = await store.list_changes_since(4)
    assert result == (
        7,
        [ListChange(seq, "add", ListEntry(F, f"n{seq - 3}.test")) for seq in (5, 6, 7)],
    )
    # Readers from before the batch missed changes that are no longer logged.
    for stale in (0, 2, 3):
        assert await store.list_changes_since(stale) is None


async def test_add_is_all_or_nothing_when_the_batch_fails_midway(store: Store) -> None:
    await store.add_list_entries(entries(F, "kept.test"))
    # Large enough that the Redis store has already uploaded chunks when it fails.
    batch = [ListEntry(P, f"host{i}.test") for i in range(25_000)]
    with pytest.raises(RuntimeError, match="mid-batch"):
        await store.add_list_entries(FailingSequence(batch, fail_at=24_000))
    assert await store.list_entries() == entries(F, "kept.test")
    assert await store.lists_version() == 1
    # The store is still usable afterwards.
    assert await store.add_list_entries(batch[:3]) == 3


async def test_unknown_list_name_midway_rejects_the_whole_batch(store: Store) -> None:
    bogus = ListEntry("allowed", "c.test")  # type: ignore[arg-type]
    batch = [*entries(P, "a.test", "b.test"), bogus, *entries(P, "d.test")]
    with pytest.raises(ValueError, match="unknown list 'allowed'"):
        await store.add_list_entries(batch)
    assert await store.list_entries() == []
    assert await store.lists_version() == 0


async def test_200k_entries_add_in_one_call_and_version_moves_per_change(
    main_backend: Backend,
) -> None:
    store = main_backend.open()
    batch = [ListEntry(F, f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}") for i in range(200_000)]
    started = time.monotonic()
    assert await store.add_list_entries(batch) == 200_000
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"200k entries took {elapsed:.1f}s"
    assert await store.lists_version() == 200_000
    assert len(await store.list_entries(F)) == 200_000
    # The default log keeps the newest 100k changes.
    assert await store.list_changes_since(0) is None
    caught_up = await store.list_changes_since(100_000)
    assert caught_up is not None
    newest, changes = caught_up
    assert newest == 200_000
    assert [c.seq for c in changes] == list(range(100_001, 200_001))
    assert await store.add_list_entries(batch[:10] + entries(P, "one-more.test")) == 1
    assert await store.lists_version() == 200_001


# --- aliases ----------------------------------------------------------------------------
async def test_aliases_set_replace_list_and_remove(store: Store) -> None:
    assert await store.get_alias("info@example.com") is None
    assert await store.list_aliases() == {}
    await store.set_alias("info@example.com", ["a@example.com", "b@example.org"])
    await store.set_alias("sales@example.com", ["c@example.com"])
    assert await store.get_alias("info@example.com") == ["a@example.com", "b@example.org"]
    await store.set_alias("info@example.com", ["z@example.com"])
    assert await store.list_aliases() == {
        "info@example.com": ["z@example.com"],
        "sales@example.com": ["c@example.com"],
    }
    assert await store.remove_alias("info@example.com") is True
    assert await store.remove_alias("info@example.com") is False
    assert await store.list_aliases() == {"sales@example.com": ["c@example.com"]}


# --- greylisting ------------------------------------------------------------------------


async def test_greylist_unknown_triplet_has_no_records(store: Store) -> None:
    assert await store.greylist_lookup(TRIPLET, NETWORK) == (None, None)


async def test_greylist_update_then_lookup_returns_both_records(store: Store) -> None:
    record = TripletRecord(first_seen=T0, last_seen=T0 + 301.25, passes=1)
    network = ClientNetworkRecord(passes=3, last_seen=T0 + 301.25)
    await store.greylist_update(TRIPLET, record, NETWORK, network, ttl=3600)
    assert await store.greylist_lookup(TRIPLET, NETWORK) == (record, network)
    # Another triplet from the same network sees the network record only.
    other = "192.0.2.0/24|carol@sender.test|alice@example.com"
    assert await store.greylist_lookup(other, NETWORK) == (None, network)


async def test_greylist_update_with_none_leaves_that_record(store: Store) -> None:
    record = TripletRecord(T0, T0, 0)
    network = ClientNetworkRecord(1, T0)
    await store.greylist_update(TRIPLET, record, NETWORK, network, ttl=3600)
    newer = TripletRecord(T0, T0 + 400, 1)
    await store.greylist_update(TRIPLET, newer, NETWORK, None, ttl=3600)
    assert await store.greylist_lookup(TRIPLET, NETWORK) == (newer, network)
    newer_network = ClientNetworkRecord(2, T0 + 500)
    await store.greylist_update(TRIPLET, None, NETWORK, newer_network, ttl=3600)
    assert await store.greylist_lookup(TRIPLET, NETWORK) == (newer, newer_network)
    await store.greylist_update(TRIPLET, None, NETWORK, None, ttl=3600)
    assert await store.greylist_lookup(TRIPLET, NETWORK) == (newer, newer_network)


async def test_greylist_records_expire_ttl_after_the_last_write(main_backend: Backend) -> None:
    # Redis expiry is real time: sleep once (plain Redis), not once per Redis topology.
    backend = main_backend
    store = backend.open()
    await store.greylist_update(
        TRIPLET, TripletRecord(T0, T0, 0), NETWORK, ClientNetworkRecord(1, T0), ttl=0.5
    )
    kept = "198.51.100.0/24|x@y.test|alice@example.com"
    await store.greylist_update(kept, TripletRecord(T0, T0, 0), "198.51.100.0/24", None, ttl=60)
    await backend.advance(0.7)
    assert await store.greylist_lookup(TRIPLET, NETWORK) == (None, None)
    assert [t for t, _ in await store.greylist_triplets()] == [kept]
    assert await store.greylist_client_networks() == []


async def test_greylist_listings_are_newest_first_and_limited(store: Store) -> None:
    for i in range(5):
        network = f"10.0.{i}.0/24"
        await store.greylist_update(
            f"{network}|s{i}@x.test|r@y.test",
            TripletRecord(T0, T0 + i, i),
            network,
            ClientNetworkRecord(i, T0 + 10 * i),
            ttl=3600,
        )
    triplets = await store.greylist_triplets(limit=3)
    assert triplets == [
        (f"10.0.{i}.0/24|s{i}@x.test|r@y.test", TripletRecord(T0, T0 + i, i)) for i in (4, 3, 2)
    ]
    assert await store.greylist_client_networks(limit=2) == [
        ("10.0.4.0/24", ClientNetworkRecord(4, T0 + 40)),
        ("10.0.3.0/24", ClientNetworkRecord(3, T0 + 30)),
    ]
    assert len(await store.greylist_triplets()) == 5


async def test_greylist_delete_by_literal_prefix_or_all(store: Store) -> None:
    names = ["10.0.0.0/24|a%b@x.test|r", "10.0.0.0/24|a_b@x.test|r", "10.0.0.0/24|zz@x.test|r"]
    names.append("2001:db8::/64|q@x.test|r")
    for name in names:
        network = name.split("|", 1)[0]
        await store.greylist_update(name, TripletRecord(T0, T0, 0), network, None, ttl=3600)
    await store.greylist_update("x", None, "10.0.0.0/24", ClientNetworkRecord(5, T0), ttl=3600)
    # % and _ are not wildcards: only the first triplet starts with "10.0.0.0/24|a%".
    assert await store.greylist_delete("10.0.0.0/24|a%") == 1
    assert await store.greylist_delete("nothing") == 0
    remaining = sorted(t for t, _ in await store.greylist_triplets())
    assert remaining == sorted(names[1:])
    assert await store.greylist_delete() == 3
    assert await store.greylist_triplets() == []
    # Deleting triplets leaves the auto-whitelist alone.
    assert await store.greylist_client_networks() == [("10.0.0.0/24", ClientNetworkRecord(5, T0))]


async def test_greylist_delete_prefix_ending_in_the_last_code_point(store: Store) -> None:
    top = "\U0010ffff"
    names = [f"a{top}", f"a{top}x", f"a{top}{top}", "b", "a", f"{top}"]
    for name in names:
        await store.greylist_update(name, TripletRecord(T0, T0, 0), "net", None, ttl=3600)
    assert await store.greylist_delete(f"a{top}") == 3
    assert await store.greylist_delete(top) == 1
    assert sorted(t for t, _ in await store.greylist_triplets()) == ["a", "b"]


async def test_greylist_purge_deletes_records_last_seen_before_now_minus_expiry(
    store: Store,
) -> None:
    old, new = "10.0.0.0/24|old@x.test|r", "10.0.1.0/24|new@x.test|r"
    await store.greylist_update(
        old, TripletRecord(T0, T0, 0), "10.0.0.0/24", ClientNetworkRecord(1, T0), ttl=3600
    )
    await store.greylist_update(
        new,
        TripletRecord(T0, T0 + 5000, 0),
        "10.0.1.0/24",
        ClientNetworkRecord(1, T0 + 5000),
        ttl=3600,
    )
    assert await store.greylist_purge_expired(now=T0 + 6000, expiry=2000) == 2
    assert await store.greylist_lookup(old, "10.0.0.0/24") == (None, None)
    assert await store.greylist_lookup(new, "10.0.1.0/24") == (
        TripletRecord(T0, T0 + 5000, 0),
        ClientNetworkRecord(1, T0 + 5000),
    )
    assert await store.greylist_purge_expired(now=T0 + 6000, expiry=2000) == 0


# --- shared state -----------------------------------------------------------------------
async def test_two_stores_on_one_backend_see_each_others_changes(backend: Backend) -> None:
    host_a, host_b = backend.open(), backend.open()
    await host_a.add_list_entries(entries(F, "203.0.113.7"))
    assert await host_b.lists_version() == 1
    assert await host_b.list_entries() == entries(F, "203.0.113.7")
    await host_b.remove_list_entries(F, ["203.0.113.7"])
    assert await host_a.list_changes_since(1) == (
        2,
        [ListChange(2, "remove", ListEntry(F, "203.0.113.7"))],
    )
    record = TripletRecord(T0, T0, 0)
    await host_a.greylist_update(TRIPLET, record, NETWORK, None, ttl=3600)
    if backend.name == "sqlite-write-behind":
        # Another process sees a write-behind update once its batch is committed.
        assert await host_b.greylist_lookup(TRIPLET, NETWORK) == (None, None)
        await asyncio.sleep(FLUSH_INTERVAL * 5)
    assert await host_b.greylist_lookup(TRIPLET, NETWORK) == (record, None)
    await host_b.set_alias("a@example.com", ["b@example.com"])
    assert await host_a.get_alias("a@example.com") == ["b@example.com"]


# --- failures ---------------------------------------------------------------------------
