"""The Redis store's own failure modes: unreachable, silent, gone away, a failed upload."""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from postwarden.store import (
    ListEntry,
    StoreError,
    TripletRecord,
    open_store,
)
from tests.fixtures.redis_server import RedisServer, free_port
from tests.integration.store.conftest import NETWORK, T0, TRIPLET, FailingSequence, P, entries


@pytest.mark.parametrize(
    "url_template",
    [
        "redis://127.0.0.1:{port}/0",
        "rediss://127.0.0.1:{port}/0",
        "redis+sentinel://127.0.0.1:{port}/mymaster/0",
        "redis+cluster://127.0.0.1:{port}",
    ],
)
async def test_redis_unreachable_raises_store_error_quickly(url_template: str) -> None:
    store = open_store(url_template.format(port=free_port()), timeout=0.5)
    calls: list[Callable[[], Awaitable[Any]]] = [
        store.lists_version,
        lambda: store.greylist_lookup(TRIPLET, NETWORK),
        lambda: store.greylist_update(TRIPLET, TripletRecord(T0, T0, 0), NETWORK, None, 60),
        lambda: store.add_list_entries(entries(P, "a.test")),
        store.list_entries,
        lambda: store.list_changes_since(0),
        store.greylist_triplets,
    ]
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreError, match="redis store") as caught:
                await call()
            assert time.monotonic() - started < 2
            assert len(str(caught.value)) < 400
    finally:
        await store.close()


async def test_redis_that_never_answers_raises_store_error_after_the_timeout() -> None:
    # A listener that accepts and then says nothing: a hung server or a black hole.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        store = open_store(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"[Tt]imeout"):
                await store.greylist_lookup(TRIPLET, NETWORK)
            assert 0.25 < time.monotonic() - started < 1.5
        finally:
            await store.close()


async def test_redis_server_going_away_raises_store_error(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    from tests.fixtures.redis_server import start_redis_server, stop_redis_server

    private = start_redis_server(tmp_path)
    store = open_store(private.url, timeout=0.5)
    try:
        await store.add_list_entries(entries(P, "a.test"))
        stop_redis_server(private.process)
        with pytest.raises(StoreError):
            await store.greylist_lookup(TRIPLET, NETWORK)
    finally:
        stop_redis_server(private.process)
        await store.close()


async def test_failed_redis_upload_leaves_no_staging_key(
    redis_url: str, redis_server: RedisServer
) -> None:
    store = open_store(redis_url)
    try:
        batch = [ListEntry(P, f"h{i}.test") for i in range(25_000)]
        with pytest.raises(RuntimeError):
            await store.add_list_entries(FailingSequence(batch, fail_at=20_000))
    finally:
        await store.close()
    client = redis_server.client()
    try:
        assert client.keys("pw:*") == []
    finally:
        client.close()
