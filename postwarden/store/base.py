"""The store contract: lists, aliases and greylist state, behind one async interface.

Two backends implement it (`sqlite.py`, the single-host default, and `redis.py`, for a
fleet of MX hosts sharing state); `tests/integration/store/test_base.py` runs the
same tests against both real backends.

Contract: docs/ARCHITECTURE.md, "Layers".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from postwarden.policy.records import (
    ClientNetworkRecord,
    ListChange,
    ListEntry,
    ListName,
    TripletRecord,
)


class StoreError(Exception):
    """The store could not answer (unreachable, timed out, corrupt). Callers answer a default."""


class Store(ABC):
    """Async persistence for everything the daemons and the CLI share."""

    # --- permitted / forbidden lists -------------------------------------------------
    @abstractmethod
    async def add_list_entries(self, entries: Sequence[ListEntry]) -> int:
        """Add entries all-or-nothing (one transaction); return how many were new.

        Re-adding an existing entry updates its comment and is not a change.
        """

    @abstractmethod
    async def remove_list_entries(self, list_name: ListName, entries: Sequence[str]) -> int:
        """Remove entries; return how many existed."""

    @abstractmethod
    async def list_entries(self, list_name: ListName | None = None) -> list[ListEntry]:
        """All entries (of one list, or both), sorted by list then entry."""

    @abstractmethod
    async def list_changes_since(self, seq: int) -> tuple[int, list[ListChange]] | None:
        """Changes after `seq`, and the newest seq; None when the log no longer reaches
        back to `seq` (the caller then reloads everything with `list_entries`)."""

    @abstractmethod
    async def lists_version(self) -> int:
        """The newest change seq (0 for never changed). Cheap: polled every refresh_interval."""

    # --- forwarding aliases ----------------------------------------------------------
    @abstractmethod
    async def set_alias(self, address: str, targets: Sequence[str]) -> None:
        """Make `address` forward to `targets` (replacing any previous rule)."""

    @abstractmethod
    async def remove_alias(self, address: str) -> bool:
        """Remove a forwarding rule; return whether it existed."""

    @abstractmethod
    async def get_alias(self, address: str) -> list[str] | None:
        """The targets of one alias, or None."""

    @abstractmethod
    async def list_aliases(self) -> dict[str, list[str]]:
        """All forwarding rules."""

    # --- greylisting -----------------------------------------------------------------
    @abstractmethod
    async def greylist_lookup(
        self, triplet: str, client_network: str
    ) -> tuple[TripletRecord | None, ClientNetworkRecord | None]:
        """Both records a greylist decision needs, in one round trip."""

    @abstractmethod
    async def greylist_update(
        self,
        triplet: str,
        record: TripletRecord | None,
        client_network: str,
        network_record: ClientNetworkRecord | None,
        ttl: float,
    ) -> None:
        """Write what the decision changed (None leaves that record as it is); records
        expire `ttl` seconds after this write."""

    @abstractmethod
    async def greylist_triplets(self, limit: int = 1000) -> list[tuple[str, TripletRecord]]:
        """Known triplets, newest first (for `postwarden greylist show`)."""

    @abstractmethod
    async def greylist_client_networks(
        self, limit: int = 1000
    ) -> list[tuple[str, ClientNetworkRecord]]:
        """Auto-whitelist state, newest first."""

    @abstractmethod
    async def greylist_delete(self, triplet_prefix: str = "") -> int:
        """Delete triplets whose key starts with the prefix ("" = all); return how many."""

    @abstractmethod
    async def greylist_purge_expired(self, now: float, expiry: float) -> int:
        """Delete records last seen before now - expiry; return how many."""

    # --- lifecycle -------------------------------------------------------------------
    @abstractmethod
    async def close(self) -> None:
        """Release connections."""
