"""open_store: the URL picks the backend; a bad URL is a ValueError that says what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from postwarden.store import StoreError, open_store
from postwarden.store.redis import RedisStore
from postwarden.store.sqlite import SqliteStore


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "unknown scheme '(none)'"),
        ("/var/lib/postwarden/state.db", "unknown scheme '(none)'"),
        ("mysql://db/postwarden", "unknown scheme 'mysql'"),
        ("memcached://127.0.0.1:11211", "allowed: sqlite:///ABSOLUTE/PATH.db, redis://"),
        ("sqlite://state.db", "absolute file path"),
        ("sqlite://relative/state.db", "absolute file path"),
        ("sqlite:///", "absolute file path"),
        ("sqlite:///var/lib/postwarden/", "names a directory"),
        ("sqlite:///var/lib/state.db?mode=ro", "no ?query"),
        ("redis://127.0.0.1:notaport/0", "127.0.0.1:notaport"),
        ("redis://127.0.0.1:99999/0", "127.0.0.1:99999"),
        ("redis://127.0.0.1:6379/zero", "must be a database number"),
        ("redis+sentinel://10.0.0.1:26379", "expected redis+sentinel://H1:P1,H2:P2/MASTER/DB"),
        ("redis+sentinel://10.0.0.1:26379/mymaster/db0", "expected redis+sentinel://"),
        ("redis+sentinel://10.0.0.1:26379/a/0/extra", "expected redis+sentinel://"),
        ("redis+sentinel://10.0.0.1:26379,10.0.0.2/mymaster/0", "'10.0.0.2' is not HOST:PORT"),
        ("redis+sentinel://10.0.0.1:0/mymaster/0", "is not HOST:PORT (port 1-65535)"),
        ("redis+cluster://10.0.0.1:7000/0", "a cluster has no database number"),
        ("redis+cluster://10.0.0.1", "'10.0.0.1' is not HOST:PORT"),
    ],
)
def test_bad_store_url_is_refused_with_what_is_allowed(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="store url") as caught:
        open_store(url)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://admin:hunter2@db/postwarden",
        "redis+cluster://:hunter2@10.0.0.1/0",
        "redis+sentinel://user:hunter2@10.0.0.1:26379",
    ],
)
def test_bad_store_url_error_does_not_show_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="store url") as caught:
        open_store(url)
    assert "hunter2" not in str(caught.value)
    assert "***" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:secret@127.0.0.1:6379/3",
        "rediss://cache.example.net:6380/1",
        "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/2",
        "redis+sentinel://:secret@[2001:db8::1]:26379/mymaster",
        "redis+cluster://10.0.0.1:7000,10.0.0.2:7000",
        "redis+cluster://10.0.0.1:7000/",
    ],
)
async def test_redis_urls_open_a_redis_store_without_connecting(url: str) -> None:
    # Nothing listens on these addresses: opening is lazy, only a call would connect.
    store = open_store(url, timeout=0.2)
    try:
        assert isinstance(store, RedisStore)
    finally:
        await store.close()


async def test_sqlite_url_opens_the_file_it_names(tmp_path: Path) -> None:
    path = tmp_path / "lib" / "state.db"
    store = open_store(f"sqlite://{path}", timeout=0.2)
    try:
        assert isinstance(store, SqliteStore)
        assert path.exists()
    finally:
        await store.close()


def test_sqlite_url_for_an_impossible_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create directory"):
        open_store(f"sqlite://{blocker}/state.db")
