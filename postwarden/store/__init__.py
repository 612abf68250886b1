"""The store: lists, aliases and greylist state shared by the daemons and the CLI.

`open_store(url)` picks the backend from the URL scheme (see `StoreConfig.url`).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from postwarden.policy.records import (
    ClientNetworkRecord,
    ListChange,
    ListEntry,
    ListName,
    TripletRecord,
)
from postwarden.store.base import Store, StoreError

__all__ = [
    "ALLOWED_URLS",
    "ClientNetworkRecord",
    "ListChange",
    "ListEntry",
    "ListName",
    "Store",
    "StoreError",
    "TripletRecord",
    "open_store",
]

ALLOWED_URLS = (
    "sqlite:///ABSOLUTE/PATH.db",
    "redis://HOST:PORT/DB",
    "rediss://HOST:PORT/DB",
    "redis+sentinel://H1:P1,H2:P2/MASTER/DB",
    "redis+cluster://HOST:PORT[,HOST:PORT]",
)
_DEFAULT_CHANGE_LOG_LIMIT = 100_000


def open_store(
    url: str, *, timeout: float = 1.0, change_log_limit: int = _DEFAULT_CHANGE_LOG_LIMIT
) -> Store:
    """Open the store a URL names. ValueError for a bad URL, StoreError if SQLite cannot open.

    Redis backends connect lazily: an unreachable server shows up as StoreError on the
    first call, not here.
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "sqlite":
        from postwarden.store.sqlite import SqliteStore

        return SqliteStore(_sqlite_path(url), timeout=timeout, change_log_limit=change_log_limit)
    if scheme in ("redis", "rediss", "redis+sentinel", "redis+cluster"):
        # Imported here so a SQLite-only install never pays for importing redis-py.
        from postwarden.store.redis import open_redis_store

        return open_redis_store(url, timeout=timeout, change_log_limit=change_log_limit)
    raise ValueError(
        f"store url {_without_password(url)!r}: unknown scheme {scheme or '(none)'!r};"
        f" allowed: {', '.join(ALLOWED_URLS)}"
    )


def _sqlite_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
        raise ValueError(
            f"store url {url!r}: a SQLite URL needs an absolute file path,"
            " as in sqlite:///var/lib/postwarden/state.db (three slashes)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"store url {url!r}: a SQLite URL takes no ?query or #fragment")
    if parts.path.endswith("/"):
        raise ValueError(f"store url {url!r}: names a directory, not a database file")
    return parts.path


def _without_password(url: str) -> str:
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{tail}" if ":" in userinfo else url
