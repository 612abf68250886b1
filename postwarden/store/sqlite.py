"""SQLite store: the single-host default, shared by every postwarden process on the host.

The sqlite3 calls run directly inside the async methods, on purpose: a lookup takes a
few microseconds, far less than handing it to a thread would cost, and the daemon does
one per request. WAL mode lets readers proceed while one process writes; writers wait at
most `busy_timeout` and then fail with StoreError (the caller answers its default).

Two files: the URL's file holds the lists and aliases, `<name>.greylist<.ext>` next to
it the greylist state. SQLite locks whole files, so a million-entry import (seconds in
one transaction) never makes the daemon's per-request greylist writes wait.

Write-behind (`enable_write_behind()`, used by policyd): a greylist update goes into an
in-memory overlay that this process's lookups consult first, and the overlay is written
in one transaction every FLUSH_INTERVAL (or at FLUSH_BATCH pending records) instead of
one autocommit per request. An autocommit costs more CPU than the rest of a request, and
with several workers each one queues on the file's write lock, inside a blocking call
that stalls the event loop. The batch is committed by a writer thread on its own
connection (sqlite3 releases the GIL), so neither the lock wait nor a WAL checkpoint's
fsync (tens of ms) stalls the loop; a failed batch is kept and retried. close()
(SIGTERM) writes what is left; a crash loses at most the last few ms of greylist state,
so those senders are greylisted once more, which is harmless. A `greylist pass` by the
CLI within those ms of a daemon's own update to the same triplet may be overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Literal

from postwarden.policy.records import (
    ClientNetworkRecord,
    ListChange,
    ListEntry,
    ListName,
    TripletRecord,
)
from postwarden.store.base import Store, StoreError

log = logging.getLogger("postwarden.store")

SCHEMA_VERSION = 1
# Seconds a write-behind update waits for company before its commit: fewer, larger
# transactions cost less per row; a crash loses at most this much greylist state.
FLUSH_INTERVAL = 0.02
FLUSH_BATCH = 512  # pending records that make a commit happen at once
# Beyond this many pending records (the file locked for a long time), updates write
# through with the normal busy timeout, and fail with StoreError if it runs out.
MAX_PENDING = 100_000
FLUSH_ERROR_LOG_INTERVAL = 60.0
DEFAULT_CHANGE_LOG_LIMIT = 100_000
_LIST_NAMES = frozenset(name.value for name in ListName)
_LIST_BY_NAME = {name.value: name for name in ListName}

# Every change to list_entries is logged by a trigger, so no code path (or a future
# one) can change a list without the daemons hearing of it. An upsert that only
# updates the comment fires no INSERT trigger: re-adding an entry is not a change.
_LISTS_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE list_entries (
    list TEXT NOT NULL,
    entry TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (list, entry)
) WITHOUT ROWID;
CREATE TABLE list_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    list TEXT NOT NULL,
    entry TEXT NOT NULL,
    comment TEXT NOT NULL
);
CREATE TRIGGER list_entry_added AFTER INSERT ON list_entries BEGIN
    INSERT INTO list_changes (op, list, entry, comment)
    VALUES ('add', NEW.list, NEW.entry, NEW.comment);
END;
CREATE TRIGGER list_entry_removed AFTER DELETE ON list_entries BEGIN
    INSERT INTO list_changes (op, list, entry, comment)
    VALUES ('remove', OLD.list, OLD.entry, OLD.comment);
END;
CREATE TABLE aliases (address TEXT PRIMARY KEY, targets TEXT NOT NULL) WITHOUT ROWID;
"""
_GREYLIST_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE greylist_triplets (
    triplet TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    passes INTEGER NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE greylist_networks (
    network TEXT PRIMARY KEY,
    passes INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
"""

_UPSERT_ENTRY = (
    "INSERT INTO list_entries (list, entry, comment) VALUES (?, ?, ?)"
    " ON CONFLICT (list, entry) DO UPDATE SET comment = excluded.comment"
)
_VERSION = "SELECT COALESCE(MAX(seq), 0) FROM list_changes"
_LOOKUP_TRIPLET = (
    "SELECT first_seen, last_seen, passes FROM greylist_triplets"
    " WHERE triplet = ? AND expires_at > ?"
)
_LOOKUP_NETWORK = (
    "SELECT passes, last_seen FROM greylist_networks WHERE network = ? AND expires_at > ?"
)
# LEFT JOINs on a one-row table: NULL columns where a record is missing.
_LOOKUP_BOTH = (
    "SELECT t.first_seen, t.last_seen, t.passes, n.passes, n.last_seen FROM (SELECT 1)"
    " LEFT JOIN greylist_triplets AS t ON t.triplet = ? AND t.expires_at > ?"
    " LEFT JOIN greylist_networks AS n ON n.network = ? AND n.expires_at > ?"
)
_UPSERT_TRIPLET = (
    "INSERT INTO greylist_triplets (triplet, first_seen, last_seen, passes, expires_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (triplet) DO UPDATE SET"
    " first_seen = excluded.first_seen, last_seen = excluded.last_seen,"
    " passes = excluded.passes, expires_at = excluded.expires_at"
)
_GREYLIST_KEYS = {"greylist_triplets": "triplet", "greylist_networks": "network"}
_MAX_PURGE_SLICES = 100_000_000  # a bound on the loop, far above any real table
_UPSERT_NETWORK = (
    "INSERT INTO greylist_networks (network, passes, last_seen, expires_at)"
    " VALUES (?, ?, ?, ?) ON CONFLICT (network) DO UPDATE SET"
    " passes = excluded.passes, last_seen = excluded.last_seen, expires_at = excluded.expires_at"
)


class _Errors:
    """Turn sqlite3 failures into StoreError, rolling back any open transaction."""

    __slots__ = ("_store",)

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        for conn in (self._store._lists_db, self._store._greylist_db):
            if conn is not None and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):  # the first error is the one to report
                    conn.rollback()
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"sqlite store {self._store.path}: {exc}") from exc


class SqliteStore(Store):
    """The Store contract on SQLite (WAL): two files, one connection to each per process."""

    # Every method answers without awaiting (lock waits are bounded by the busy timeout),
    # so callers need no asyncio timeout around it (see Pipeline).
    synchronous = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 1.0,
        change_log_limit: int = DEFAULT_CHANGE_LOG_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open (creating the directory and schema if needed). Raises StoreError."""
        if change_log_limit < 1:
            raise ValueError("change_log_limit must be at least 1")
        self.path = Path(path)
        self.greylist_path = self.path.with_name(f"{self.path.stem}.greylist{self.path.suffix}")
        self._timeout = timeout
        self._change_log_limit = change_log_limit
        self._clock = clock
        self._lists_db: sqlite3.Connection | None = None
        self._greylist_db: sqlite3.Connection | None = None
        self._inherited: list[sqlite3.Connection | None] = []
        self._errors = _Errors(self)
        self._closed = False
        self.purge_slice = 5000  # rows per purge transaction (a few ms of write lock)
        self._write_behind = False
        # Pending greylist writes: key -> the row's values after the key.
        self._pending_triplets: dict[str, tuple[float, float, int, float]] = {}
        self._pending_networks: dict[str, tuple[int, float, float]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        # The batch the writer thread is committing (lookups consult it too), on the
        # writer's own connection.
        self._batch: (
            tuple[dict[str, tuple[float, float, int, float]], dict[str, tuple[int, float, float]]]
            | None
        ) = None
        self._batch_future: Future[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._writer_db: sqlite3.Connection | None = None
        self._flush_error_logged = 0.0
        with self._errors:
            self._open()
        _OPEN_STORES.add(self)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"sqlite store {self.path}: cannot create directory: {exc}") from exc
        self._lists_db = self._connect(self.path, _LISTS_SCHEMA)
        try:
            self._greylist_db = self._connect(self.greylist_path, _GREYLIST_SCHEMA)
        except BaseException:
            self._lists_db.close()
            self._lists_db = None
            raise

    def _connect(self, path: Path, schema: str) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves, so reads are not left in an
        # open transaction that would pin an old WAL snapshot.
        conn = sqlite3.connect(
            path,
            timeout=self._timeout,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=64,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"sqlite store {path}: cannot enable WAL (got {mode})")
            # NORMAL in WAL mode: a power loss may lose the last commits, never corrupts.
            conn.execute("PRAGMA synchronous = NORMAL")
            self._ensure_schema(conn, path, schema)
        except BaseException:
            conn.close()
            raise
        return conn

    def _ensure_schema(self, conn: sqlite3.Connection, path: Path, schema: str) -> None:
        # Checked without a lock first: opening must not wait for a running import.
        if self._schema_version(conn) is None:
            # IMMEDIATE: two processes creating a new file at once must not both create it.
            conn.execute("BEGIN IMMEDIATE")
            try:
                if self._schema_version(conn) is None:
                    for statement in _split_script(schema):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
        version = self._schema_version(conn)
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"sqlite store {path}: schema version {version}, this postwarden"
                f" knows {SCHEMA_VERSION}"
            )

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int | None:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if exists is None:
            return None
        version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        return None if version is None else int(version)

    def _after_fork(self) -> None:
        # A connection must not cross fork(): a worker forked after open gets its own
        # (opened on first use). The parent's are kept, untouched: even closing them in
        # the child could disturb the parent's locks (SQLite: never use a connection
        # across fork). Pending writes are the parent's to commit, not the child's.
        self._inherited += (self._lists_db, self._greylist_db, self._writer_db)
        self._lists_db = self._greylist_db = self._writer_db = None
        self._pending_triplets = {}
        self._pending_networks = {}
        self._flush_handle = None
        self._flush_loop = None
        self._batch = self._batch_future = None
        self._executor = None  # its thread does not exist in the child

    def _reopen(self) -> None:
        if self._closed:
            raise StoreError(f"sqlite store {self.path}: closed")
        for conn in (self._lists_db, self._greylist_db):
            if conn is not None:
                conn.close()
        self._lists_db = self._greylist_db = None
        self._open()

    @property
    def _lists(self) -> sqlite3.Connection:
        # No getpid() per access: the fork hook clears the connections in a child.
        if self._lists_db is None:
            self._reopen()
        assert self._lists_db is not None
        return self._lists_db

    @property
    def _greylist(self) -> sqlite3.Connection:
        if self._greylist_db is None:
            self._reopen()
        assert self._greylist_db is not None
        return self._greylist_db

    def enable_write_behind(self) -> None:
        """Batch greylist updates in memory and commit them every few ms (see the module)."""
        self._write_behind = True

    # --- permitted / forbidden lists -------------------------------------------------
    async def add_list_entries(self, entries: Sequence[ListEntry]) -> int:
        with self._errors:
            conn = self._lists
            conn.execute("BEGIN IMMEDIATE")
            before = conn.execute(_VERSION).fetchone()[0]
            conn.executemany(_UPSERT_ENTRY, _entry_rows(entries))
            after = conn.execute(_VERSION).fetchone()[0]
            self._trim_change_log(conn, after)
            conn.execute("COMMIT")
        return int(after - before)

    async def remove_list_entries(self, list_name: ListName, entries: Sequence[str]) -> int:
        name = _checked_list_name(list_name)
        with self._errors:
            conn = self._lists
            conn.execute("BEGIN IMMEDIATE")
            before = conn.execute(_VERSION).fetchone()[0]
            conn.executemany(
                "DELETE FROM list_entries WHERE list = ? AND entry = ?",
                ((name, entry) for entry in entries),
            )
            after = conn.execute(_VERSION).fetchone()[0]
            self._trim_change_log(conn, after)
            conn.execute("COMMIT")
        return int(after - before)

    def _trim_change_log(self, conn: sqlite3.Connection, newest: int) -> None:
        conn.execute("DELETE FROM list_changes WHERE seq <= ?", (newest - self._change_log_limit,))

    async def list_entries(self, list_name: ListName | None = None) -> list[ListEntry]:
        with self._errors:
            if list_name is None:
                rows = self._lists.execute(
                    "SELECT list, entry, comment FROM list_entries ORDER BY list, entry"
                ).fetchall()
            else:
                rows = self._lists.execute(
                    "SELECT list, entry, comment FROM list_entries WHERE list = ? ORDER BY entry",
                    (_checked_list_name(list_name),),
                ).fetchall()
        # A dict lookup, not ListName(name): a million-entry reload pays it per row.
        names = _LIST_BY_NAME
        return [ListEntry(names[name], entry, comment) for name, entry, comment in rows]

    async def list_changes_since(self, seq: int) -> tuple[int, list[ListChange]] | None:
        with self._errors:
            conn = self._lists
            conn.execute("BEGIN")  # one snapshot for the bounds and the rows
            newest = conn.execute(_VERSION).fetchone()[0]
            if seq == newest:
                conn.execute("COMMIT")
                return newest, []
            oldest = conn.execute("SELECT MIN(seq) FROM list_changes").fetchone()[0]
            # seq > newest: the caller saw a store that has since been replaced.
            if seq > newest or oldest is None or oldest > seq + 1:
                conn.execute("COMMIT")
                return None
            rows = conn.execute(
                "SELECT seq, op, list, entry, comment FROM list_changes WHERE seq > ? ORDER BY seq",
                (seq,),
            ).fetchall()
            conn.execute("COMMIT")
        changes = [
            ListChange(row_seq, _op(op), ListEntry(_LIST_BY_NAME[name], entry, comment))
            for row_seq, op, name, entry, comment in rows
        ]
        return newest, changes

    async def lists_version(self) -> int:
        with self._errors:
            return int(self._lists.execute(_VERSION).fetchone()[0])

    # --- forwarding aliases ----------------------------------------------------------
    async def set_alias(self, address: str, targets: Sequence[str]) -> None:
        with self._errors:
            self._lists.execute(
                "INSERT INTO aliases (address, targets) VALUES (?, ?)"
                " ON CONFLICT (address) DO UPDATE SET targets = excluded.targets",
                (address, json.dumps(list(targets))),
            )

    async def remove_alias(self, address: str) -> bool:
        with self._errors:
            cursor = self._lists.execute("DELETE FROM aliases WHERE address = ?", (address,))
        return cursor.rowcount > 0

    async def get_alias(self, address: str) -> list[str] | None:
        with self._errors:
            row = self._lists.execute(
                "SELECT targets FROM aliases WHERE address = ?", (address,)
            ).fetchone()
        return None if row is None else _targets(row[0])

    async def list_aliases(self) -> dict[str, list[str]]:
        with self._errors:
            rows = self._lists.execute(
                "SELECT address, targets FROM aliases ORDER BY address"
            ).fetchall()
        return {address: _targets(targets) for address, targets in rows}

    # --- greylisting -----------------------------------------------------------------
    async def greylist_lookup(
        self, triplet: str, client_network: str
    ) -> tuple[TripletRecord | None, ClientNetworkRecord | None]:
        now = self._clock()
        # A pending write is newer than anything in the file: it decides alone.
        pt = self._pending_triplets.get(triplet)
        pn = self._pending_networks.get(client_network)
        if self._batch is not None:
            if pt is None:
                pt = self._batch[0].get(triplet)
            if pn is None:
                pn = self._batch[1].get(client_network)
        with self._errors:
            if pt is None and pn is None:
                # Both in one statement: one read transaction instead of two.
                row = self._greylist.execute(
                    _LOOKUP_BOTH, (triplet, now, client_network, now)
                ).fetchone()
                t = None if row[0] is None else row[:3]
                n = None if row[3] is None else row[3:]
            else:
                if pt is None:
                    t = self._greylist.execute(_LOOKUP_TRIPLET, (triplet, now)).fetchone()
                else:
                    t = pt if pt[3] > now else None
                if pn is None:
                    n = self._greylist.execute(_LOOKUP_NETWORK, (client_network, now)).fetchone()
                else:
                    n = pn if pn[2] > now else None
        return (
            None if t is None else TripletRecord(t[0], t[1], t[2]),
            None if n is None else ClientNetworkRecord(n[0], n[1]),
        )

    async def greylist_update(
        self,
        triplet: str,
        record: TripletRecord | None,
        client_network: str,
        network_record: ClientNetworkRecord | None,
        ttl: float,
    ) -> None:
        if record is None and network_record is None:
            return
        expires_at = self._clock() + ttl
        if self._write_behind:
            if record is not None:
                self._pending_triplets[triplet] = (
                    record.first_seen,
                    record.last_seen,
                    record.passes,
                    expires_at,
                )
            if network_record is not None:
                self._pending_networks[client_network] = (
                    network_record.passes,
                    network_record.last_seen,
                    expires_at,
                )
            self._schedule_flush()
            return
        with self._errors:
            conn = self._greylist
            both = record is not None and network_record is not None
            if both:
                conn.execute("BEGIN IMMEDIATE")
            if record is not None:
                conn.execute(
                    _UPSERT_TRIPLET,
                    (triplet, record.first_seen, record.last_seen, record.passes, expires_at),
                )
            if network_record is not None:
                conn.execute(
                    _UPSERT_NETWORK,
                    (client_network, network_record.passes, network_record.last_seen, expires_at),
                )
            if both:
                conn.execute("COMMIT")

    def _schedule_flush(self) -> None:
        pending = len(self._pending_triplets) + len(self._pending_networks)
        if pending >= MAX_PENDING:
            self._flush_now()  # StoreError if the file stays locked: the default answer
            return
        loop = asyncio.get_running_loop()
        if self._flush_loop is not loop:  # first use, or a new loop (tests): start over
            self._flush_loop = loop
            self._flush_handle = None
        if self._flush_handle is None and self._batch is None:
            delay = 0.0 if pending >= FLUSH_BATCH else FLUSH_INTERVAL
            self._flush_handle = loop.call_later(delay, self._flush_due)

    def _flush_due(self) -> None:
        """Hand the pending records to the writer thread as one batch."""
        self._flush_handle = None
        if self._batch is not None or self._flush_loop is None or self._closed:
            return  # the batch in flight re-arms the timer when it is done
        if not self._pending_triplets and not self._pending_networks:
            return
        loop = self._flush_loop
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="greylist-writer")
        batch = (self._pending_triplets, self._pending_networks)
        self._batch = batch
        self._pending_triplets, self._pending_networks = {}, {}
        future = self._executor.submit(self._write_batch, *batch)
        self._batch_future = future
        future.add_done_callback(
            lambda done: (
                loop.call_soon_threadsafe(self._batch_done, done) if not loop.is_closed() else None
            )
        )

    def _write_batch(
        self,
        triplets: dict[str, tuple[float, float, int, float]],
        networks: dict[str, tuple[int, float, float]],
    ) -> None:
        """One transaction, in the writer thread: sqlite3 releases the GIL while it works,
        so the commit and any checkpoint (an fsync) never stall the event loop."""
        if self._writer_db is None:
            self._writer_db = self._connect(self.greylist_path, _GREYLIST_SCHEMA)
        conn = self._writer_db
        try:
            conn.execute("BEGIN IMMEDIATE")
            if triplets:
                conn.executemany(_UPSERT_TRIPLET, [(k, *row) for k, row in triplets.items()])
            if networks:
                conn.executemany(_UPSERT_NETWORK, [(k, *row) for k, row in networks.items()])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            raise

    def _batch_done(self, future: Future[None]) -> None:
        """In the loop: forget a written batch, or take a failed one back for a retry."""
        if future is not self._batch_future or self._batch is None:
            return  # already handled by _flush_now
        triplets, networks = self._batch
        self._batch = self._batch_future = None
        exc = future.exception()
        if exc is not None:
            # Records written since are newer: they win over the failed batch's.
            triplets.update(self._pending_triplets)
            networks.update(self._pending_networks)
            self._pending_triplets, self._pending_networks = triplets, networks
            if not isinstance(exc, sqlite3.Error) or not _is_busy(exc):
                self._log_flush_error(exc)
        if (self._pending_triplets or self._pending_networks) and not self._closed:
            loop = self._flush_loop
            if loop is not None and self._flush_handle is None and not loop.is_closed():
                self._flush_handle = loop.call_later(FLUSH_INTERVAL, self._flush_due)

    def _log_flush_error(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._flush_error_logged >= FLUSH_ERROR_LOG_INTERVAL:
            self._flush_error_logged = now
            log.error(
                "sqlite store %s: greylist write failed, kept in memory and retried: %s",
                self.greylist_path,
                exc,
            )

    def _flush_now(self) -> None:
        """Write every pending record before returning (waits; StoreError on failure).

        Before reading or deleting greylist state in bulk, at close, and when too much
        is pending: the file must be current.
        """
        future = self._batch_future
        if future is not None:
            with contextlib.suppress(BaseException):
                future.result()
            self._batch_done(future)
        if not self._pending_triplets and not self._pending_networks:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch = (self._pending_triplets, self._pending_networks)
        try:
            self._write_batch(*batch)  # no batch in flight: the writer connection is free
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite store {self.greylist_path}: {exc}") from exc
        self._pending_triplets, self._pending_networks = {}, {}

    async def greylist_triplets(self, limit: int = 1000) -> list[tuple[str, TripletRecord]]:
        with self._errors:
            self._flush_now()
            rows = self._greylist.execute(
                "SELECT triplet, first_seen, last_seen, passes FROM greylist_triplets"
                " WHERE expires_at > ? ORDER BY last_seen DESC, triplet LIMIT ?",
                (self._clock(), limit),
            ).fetchall()
        return [
            (triplet, TripletRecord(first, last, passes)) for triplet, first, last, passes in rows
        ]

    async def greylist_client_networks(
        self, limit: int = 1000
    ) -> list[tuple[str, ClientNetworkRecord]]:
        with self._errors:
            self._flush_now()
            rows = self._greylist.execute(
                "SELECT network, passes, last_seen FROM greylist_networks"
                " WHERE expires_at > ? ORDER BY last_seen DESC, network LIMIT ?",
                (self._clock(), limit),
            ).fetchall()
        return [(network, ClientNetworkRecord(passes, last)) for network, passes, last in rows]

    async def greylist_delete(self, triplet_prefix: str = "") -> int:
        with self._errors:
            self._flush_now()
            if not triplet_prefix:
                return self._greylist.execute("DELETE FROM greylist_triplets").rowcount
            # A key range, not LIKE/GLOB: the prefix matches literally (% _ * included)
            # and the primary key finds the rows without scanning the table.
            upper = _prefix_successor(triplet_prefix)
            if upper is None:
                cursor = self._greylist.execute(
                    "DELETE FROM greylist_triplets WHERE triplet >= ?", (triplet_prefix,)
                )
            else:
                cursor = self._greylist.execute(
                    "DELETE FROM greylist_triplets WHERE triplet >= ? AND triplet < ?",
                    (triplet_prefix, upper),
                )
        return cursor.rowcount

    async def greylist_purge_expired(self, now: float, expiry: float) -> int:
        # Slices of the primary key, one short transaction each: daemons write this file
        # on every request and must not wait for a purge of a million rows.
        cutoff = now - expiry
        deleted = 0
        with self._errors:
            self._flush_now()
            conn = self._greylist
            for table in _GREYLIST_KEYS:
                deleted += self._purge_table(conn, table, cutoff, now)
        return deleted

    def _purge_table(self, conn: sqlite3.Connection, table: str, cutoff: float, now: float) -> int:
        key = _GREYLIST_KEYS[table]
        # Records past their ttl are already invisible; delete them too.
        expired = "(last_seen < ? OR expires_at <= ?)"
        deleted = 0
        low: tuple[str, ...] = ()  # the first slice has no lower bound
        for _ in range(_MAX_PURGE_SLICES):
            # Plain "key > ?" (not "? IS NULL OR ..."), so the primary key is searched.
            after = f"{key} > ? AND " if low else ""
            row = conn.execute(
                f"SELECT {key} FROM {table} WHERE {after}1 ORDER BY {key} LIMIT 1 OFFSET ?",  # noqa: S608 -- fixed names
                (*low, self.purge_slice - 1),
            ).fetchone()
            if row is None:  # less than a slice left
                return (
                    deleted
                    + conn.execute(
                        f"DELETE FROM {table} WHERE {after}{expired}",  # noqa: S608 -- fixed names
                        (*low, cutoff, now),
                    ).rowcount
                )
            deleted += conn.execute(
                f"DELETE FROM {table} WHERE {after}{key} <= ? AND {expired}",  # noqa: S608
                (*low, row[0], cutoff, now),
            ).rowcount
            low = (row[0],)
        return deleted

    # --- lifecycle -------------------------------------------------------------------
    async def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        try:
            if not self._closed:
                self._flush_now()  # SIGTERM: pending greylist writes are not lost
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            connections = (self._lists_db, self._greylist_db, self._writer_db)
            self._lists_db = self._greylist_db = self._writer_db = None
            _OPEN_STORES.discard(self)
            with self._errors:
                for conn in connections:
                    if conn is not None:
                        conn.close()


_OPEN_STORES: weakref.WeakSet[SqliteStore] = weakref.WeakSet()


def _forget_parent_connections() -> None:
    for store in list(_OPEN_STORES):
        store._after_fork()


os.register_at_fork(after_in_child=_forget_parent_connections)


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _split_script(script: str) -> Iterator[str]:
    """Statements of _SCHEMA (executescript would COMMIT our IMMEDIATE transaction)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement.strip()
            statement = ""


def _prefix_successor(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (None: none)."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        # Skip the surrogates: they never occur in stored (UTF-8) text.
        nxt = 0xE000 if last + 1 == 0xD800 else last + 1
        if nxt <= 0x10FFFF:
            return "".join(chars) + chr(nxt)
    return None


def _checked_list_name(name: str) -> str:
    if name not in _LIST_NAMES:
        raise ValueError(f"unknown list {name!r}; allowed: {', '.join(sorted(_LIST_NAMES))}")
    return str(name)


def _entry_rows(entries: Sequence[ListEntry]) -> Iterator[tuple[str, str, str]]:
    # A generator: executemany streams a million rows without a second copy in memory.
    for e in entries:
        yield _checked_list_name(e.list_name), e.entry, e.comment


def _op(op: str) -> Literal["add", "remove"]:
    if op == "add":
        return "add"
    if op == "remove":
        return "remove"
    raise StoreError(f"sqlite store: corrupt change log (op {op!r})")


def _targets(raw: str) -> list[str]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"sqlite store: corrupt alias targets {raw!r}") from exc
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise StoreError(f"sqlite store: corrupt alias targets {raw!r}")
    return value
