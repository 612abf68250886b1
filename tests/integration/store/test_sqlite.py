"""The SQLite store's own behaviour: locking, WAL, processes sharing one file, write-behind."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import sqlite3
import time
from pathlib import Path

import pytest

from postwarden.store import (
    ClientNetworkRecord,
    StoreError,
    TripletRecord,
    open_store,
)
from postwarden.store.sqlite import FLUSH_INTERVAL, SqliteStore
from tests.integration.store.conftest import NETWORK, T0, TRIPLET, F, P, entries


def test_sqlite_unwritable_path_raises_store_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    # Root ignores permission bits, so "a file where a directory must be" is the
    # unwritable path that fails for every user.
    with pytest.raises(StoreError, match="cannot create directory"):
        open_store(f"sqlite://{not_a_directory}/sub/state.db")
    with pytest.raises(StoreError, match="sqlite store"):
        open_store(f"sqlite://{not_a_directory}/state.db")


async def test_sqlite_write_blocked_by_another_writer_fails_and_rolls_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path, timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        with pytest.raises(StoreError, match="locked"):
            await store.add_list_entries(entries(P, "a.test", "b.test"))
        assert time.monotonic() - started < 2
        # Readers are not blocked by a writer in WAL mode.
        assert await store.greylist_lookup(TRIPLET, NETWORK) == (None, None)
        other.execute("ROLLBACK")
        assert await store.list_entries() == []
        assert await store.add_list_entries(entries(P, "a.test")) == 1
    finally:
        other.close()
        await store.close()


async def test_sqlite_list_import_in_progress_does_not_block_greylist_writes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SqliteStore(path, timeout=1.0)
    importer = sqlite3.connect(path, isolation_level=None)
    try:
        # The CLI in the middle of a long import holds the lists file's write lock.
        importer.execute("BEGIN IMMEDIATE")
        importer.execute("INSERT INTO list_entries VALUES ('forbidden', 'x.test', '')")
        started = time.monotonic()
        record = TripletRecord(T0, T0, 0)
        await store.greylist_update(TRIPLET, record, NETWORK, None, ttl=3600)
        assert await store.greylist_lookup(TRIPLET, NETWORK) == (record, None)
        assert time.monotonic() - started < 0.1  # no busy wait at all
        assert await store.lists_version() == 0  # readers see the last commit
        # Another daemon or CLI starting meanwhile opens without waiting either.
        started = time.monotonic()
        await SqliteStore(path, timeout=1.0).close()
        assert time.monotonic() - started < 0.5
        importer.execute("COMMIT")
        assert await store.lists_version() == 1
    finally:
        importer.close()
        await store.close()


async def test_sqlite_purge_in_short_slices_deletes_exactly_the_old_records(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "state.db")
    store.purge_slice = 4  # many slices, and a last partial one
    old_ones: list[str] = []
    new_ones: list[str] = []
    for i in range(23):
        triplet, network = f"t{i:02}", f"n{i:02}"
        last_seen = T0 if i % 3 == 0 else T0 + 5000
        (old_ones if i % 3 == 0 else new_ones).append(triplet)
        await store.greylist_update(
            triplet,
            TripletRecord(T0, last_seen, 0),
            network,
            ClientNetworkRecord(1, last_seen),
            ttl=1e9,
        )
    try:
        assert await store.greylist_purge_expired(now=T0 + 6000, expiry=2000) == 2 * len(old_ones)
        assert sorted(t for t, _ in await store.greylist_triplets()) == new_ones
        assert len(await store.greylist_client_networks()) == len(new_ones)
    finally:
        await store.close()


async def test_sqlite_closed_store_raises_store_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.lists_version()


def test_sqlite_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    asyncio.run(SqliteStore(path).close())
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(path)


def test_sqlite_uses_wal_journal_in_both_files(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    asyncio.run(SqliteStore(path).close())
    for name in ("state.db", "state.greylist.db"):
        conn = sqlite3.connect(tmp_path / name)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()


def test_sqlite_processes_share_one_file_while_writing_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "shared" / "state.db")
    # spawn: each worker opens the (possibly not yet created) file itself, as
    # policyd workers and the CLI do; creating the schema must not race.
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_sqlite_worker, args=(path, role, index))
        for index, role in enumerate(["greylist", "greylist", "import"])
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0, 0, 0]

    async def check() -> None:
        store = SqliteStore(path)
        try:
            assert len(await store.greylist_triplets(limit=10_000)) == 600
            assert len(await store.list_entries(F)) == 20_000
            assert await store.lists_version() == 20_000
        finally:
            await store.close()

    asyncio.run(check())


def test_sqlite_store_opened_before_fork_works_in_the_child(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    asyncio.run(store.add_list_entries(entries(P, "parent.test")))
    pid = os.fork()
    if pid == 0:  # the child: a policyd worker forked after the store was opened
        code = 1
        try:
            asyncio.run(store.add_list_entries(entries(P, "child.test")))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert asyncio.run(store.list_entries()) == entries(P, "child.test", "parent.test")
    asyncio.run(store.close())


async def test_sqlite_write_behind_commits_pending_updates_on_close(tmp_path: Path) -> None:
    daemon = SqliteStore(tmp_path / "state.db")
    daemon.enable_write_behind()
    cli = SqliteStore(tmp_path / "state.db")
    try:
        record, network = TripletRecord(T0, T0, 0), ClientNetworkRecord(1, T0)
        await daemon.greylist_update(TRIPLET, record, NETWORK, network, ttl=3600)
        assert await daemon.greylist_lookup(TRIPLET, NETWORK) == (record, network)
        assert await cli.greylist_lookup(TRIPLET, NETWORK) == (None, None)  # not yet due
        await daemon.close()  # what SIGTERM does: nothing pending is lost
        assert await cli.greylist_lookup(TRIPLET, NETWORK) == (record, network)
    finally:
        await daemon.close()
        await cli.close()


async def test_sqlite_write_behind_never_waits_for_a_locked_file(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db", timeout=2.0)
    store.enable_write_behind()
    locker = sqlite3.connect(store.greylist_path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        record = TripletRecord(T0, T0, 0)
        started = time.monotonic()
        await store.greylist_update(TRIPLET, record, NETWORK, None, ttl=3600)
        await asyncio.sleep(FLUSH_INTERVAL * 3)  # the batch is due meanwhile
        # The writer thread waits for the lock, not the event loop.
        assert time.monotonic() - started < 1.0  # not the 2 s busy timeout
        assert (await store.greylist_lookup(TRIPLET, NETWORK))[0] == record
        locker.execute("COMMIT")
        deadline = time.monotonic() + 3.0  # the writer's busy wait, or a retry, finishes it
        while not locker.execute("SELECT first_seen FROM greylist_triplets").fetchall():
            assert time.monotonic() < deadline, "never committed once the lock was free"
            await asyncio.sleep(FLUSH_INTERVAL)
        assert locker.execute("SELECT first_seen FROM greylist_triplets").fetchall() == [(T0,)]
    finally:
        locker.close()
        await store.close()


def _sqlite_worker(path: str, role: str, index: int) -> None:
    """A separate process on the same file: a policyd worker or the CLI importing."""

    async def work() -> None:
        store = SqliteStore(path, timeout=2.0)
        try:
            if role == "greylist":
                for i in range(300):
                    network = f"10.{index}.{i % 256}.0/24"
                    triplet = f"{network}|s{i}@x.test|r@y.test"
                    record, _ = await store.greylist_lookup(triplet, network)
                    assert record is None
                    await store.greylist_update(
                        triplet, TripletRecord(T0, T0 + i, 0), network, None, ttl=3600
                    )
            else:
                for batch in range(4):
                    names = (f"{index}-{batch}-{i}.test" for i in range(5000))
                    assert await store.add_list_entries(entries(F, *names)) == 5000
        finally:
            await store.close()

    asyncio.run(work())
