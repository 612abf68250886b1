"""The lists a running daemon matches against, kept in step with the store.

The daemon loads every entry once, then polls the cheap `lists_version()` every
`store.refresh_interval` (at most 1 s, so a `postwarden lists add` is visible within a
second) and applies only the changes since the version it holds. When the store's change
log no longer reaches back that far it reloads everything. A store outage keeps the last
good lists: refusing to match at all would be worse than matching slightly old lists.
"""

from __future__ import annotations

import asyncio
import logging
import time

from postwarden.policy.list_entries import CompiledLists
from postwarden.store.base import Store, StoreError

log = logging.getLogger("postwarden.policy.list_entries")

# How often a store outage is logged while it lasts (seconds).
OUTAGE_LOG_INTERVAL = 60.0


class LiveLists:
    """The current compiled lists and the store change seq they reflect."""

    __slots__ = ("current", "version")

    def __init__(self, current: CompiledLists | None = None, version: int = -1) -> None:
        self.current = current if current is not None else CompiledLists.from_entries(())
        # -1: never loaded (the store was unreachable at start): the next refresh loads all.
        self.version = version

    async def reload(self, store: Store) -> None:
        """Load every entry; the version is read first so no change is missed."""
        version = await store.lists_version()
        entries = await store.list_entries()
        # Compiled in a worker thread (a million entries take seconds of CPU; the GIL still
        # lets the event loop answer requests meanwhile), then swapped in whole: requests
        # never see a half-built object.
        self.current = await asyncio.to_thread(CompiledLists.from_entries, entries)
        self.version = version

    async def refresh(self, store: Store) -> bool:
        """Bring the lists up to date; return whether anything changed."""
        if self.version < 0:
            await self.reload(store)
            return True
        version = await store.lists_version()
        if version == self.version:
            return False
        result = await store.list_changes_since(self.version)
        if result is None:
            await self.reload(store)
            return True
        newest, changes = result
        # Changes are applied in place between requests (one event loop, no await inside),
        # so a request sees the lists either before or after the whole batch.
        self.current.apply(changes)
        self.version = newest
        return True


async def keep_lists_fresh(live: LiveLists, store: Store, interval: float) -> None:
    """Refresh `live` every `interval` seconds until cancelled; outages are logged, not fatal."""
    failing_since: float | None = None
    last_logged = 0.0
    while True:
        try:
            changed = await live.refresh(store)
        except (StoreError, TimeoutError, OSError) as exc:
            now = time.monotonic()
            if failing_since is None or now - last_logged >= OUTAGE_LOG_INTERVAL:
                log.warning("lists: store unreachable, keeping the last good lists: %s", exc)
                last_logged = now
            if failing_since is None:
                failing_since = now
        except Exception:
            # An unexpected bug must not stop the refresher for good: log once a minute.
            now = time.monotonic()
            if now - last_logged >= OUTAGE_LOG_INTERVAL:
                log.exception("lists: refresh failed unexpectedly, keeping the last good lists")
                last_logged = now
        else:
            if failing_since is not None:
                log.info("lists: store reachable again, lists at version %d", live.version)
                failing_since = None
            elif changed:
                log.debug("lists: now at version %d", live.version)
        await asyncio.sleep(interval)
