"""What the store tests share: one fixture per backend (SQLite, Redis, Cluster, Sentinel)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import pytest

from postwarden.store import (
    ListEntry,
    ListName,
    Store,
)
from postwarden.store.redis import open_redis_store
from postwarden.store.sqlite import SqliteStore

P, F = ListName.PERMITTED, ListName.FORBIDDEN
T0 = 1_700_000_000.0  # a fixed "now" for greylist records
TRIPLET = "192.0.2.0/24|bob@sender.test|alice@example.com"
NETWORK = "192.0.2.0/24"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """How to open stores on one shared state, and how to let TTL time pass."""

    name: str
    opener: Callable[[int], Store]
    advance: Callable[[float], Awaitable[None]]
    opened: list[Store] = field(default_factory=list)

    def open(self, change_log_limit: int = 100_000) -> Store:
        store = self.opener(change_log_limit)
        self.opened.append(store)
        return store


def make_backend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if name in ("sqlite", "sqlite-write-behind"):
        clock = FakeClock()
        path = tmp_path / "state" / "postwarden.db"

        async def advance_clock(seconds: float) -> None:
            clock.now += seconds

        def open_sqlite(limit: int) -> Store:
            store = SqliteStore(path, timeout=0.5, change_log_limit=limit, clock=clock)
            if name == "sqlite-write-behind":
                store.enable_write_behind()  # as policyd uses it: same contract
            return store

        return Backend(name, open_sqlite, advance_clock)
    # Plain Redis, a Cluster (keys that one script touches must share a slot) and a
    # Sentinel (the client asks it for the master): the URL is all that differs.
    url = request.getfixturevalue(
        {"redis": "redis_url", "redis-cluster": "redis_cluster_url"}.get(name, "redis_sentinel_url")
    )
    return Backend(
        name,
        lambda limit: open_redis_store(url, timeout=2.0, change_log_limit=limit),
        asyncio.sleep,  # Redis expires keys on its own clock
    )


@pytest.fixture(
    params=["sqlite", "sqlite-write-behind", "redis", "redis-cluster", "redis-sentinel"]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    result = make_backend(request.param, request, tmp_path)
    yield result
    for store in result.opened:
        await store.close()


@pytest.fixture(params=["sqlite", "redis"])
async def main_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """The two backends only, for the slow tests (Cluster/Sentinel run the same code)."""
    result = make_backend(request.param, request, tmp_path)
    yield result
    for store in result.opened:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()


def entries(list_name: ListName, *names: str, comment: str = "") -> list[ListEntry]:
    return [ListEntry(list_name, name, comment) for name in names]


class FailingSequence(Sequence[ListEntry]):
    """A batch whose item `fail_at` cannot be produced: the failure comes mid-batch."""

    def __init__(self, items: list[ListEntry], fail_at: int) -> None:
        self._items = items
        self._fail_at = fail_at

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> ListEntry: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ListEntry]: ...
    def __getitem__(self, index: int | slice) -> ListEntry | Sequence[ListEntry]:
        if isinstance(index, slice):
            raise NotImplementedError
        if index == self._fail_at:
            raise RuntimeError("entry source failed mid-batch")
        return self._items[index]

    def __iter__(self) -> Iterator[ListEntry]:
        for index in range(len(self._items)):
            yield self[index]
