"""An in-memory store for the policy tests: just enough of the contract, with a switch to fail."""

from __future__ import annotations

from collections.abc import Sequence

from postwarden.policy.records import (
    ClientNetworkRecord,
    ListChange,
    ListEntry,
    ListName,
    TripletRecord,
)
from postwarden.store.base import Store, StoreError


class FakeStore(Store):
    """Just enough of the store contract, in memory, with a switch to make it fail."""

    def __init__(self) -> None:
        self.entries: dict[tuple[ListName, str], ListEntry] = {}
        self.changes: list[ListChange] = []
        self.triplets: dict[str, TripletRecord] = {}
        self.networks: dict[str, ClientNetworkRecord] = {}
        self.failing = False
        self.failing_calls: set[str] = set()  # fail only these calls
        self.forget_log = False
        self.calls: list[str] = []

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if self.failing or name in self.failing_calls:
            raise StoreError("connection refused")

    async def add_list_entries(self, entries: Sequence[ListEntry]) -> int:
        self._check("add")
        new = 0
        for e in entries:
            if (e.list_name, e.entry) not in self.entries:
                new += 1
                self.changes.append(ListChange(len(self.changes) + 1, "add", e))
            self.entries[(e.list_name, e.entry)] = e
        return new

    async def remove_list_entries(self, list_name: ListName, entries: Sequence[str]) -> int:
        self._check("remove")
        gone = 0
        for text in entries:
            e = self.entries.pop((list_name, text), None)
            if e is not None:
                gone += 1
                self.changes.append(ListChange(len(self.changes) + 1, "remove", e))
        return gone

    async def list_entries(self, list_name: ListName | None = None) -> list[ListEntry]:
        self._check("list_entries")
        return sorted(self.entries.values(), key=lambda e: (e.list_name, e.entry))

    async def list_changes_since(self, seq: int) -> tuple[int, list[ListChange]] | None:
        self._check("changes")
        if self.forget_log:
            return None
        return len(self.changes), self.changes[seq:]

    async def lists_version(self) -> int:
        self._check("version")
        return len(self.changes)

    async def set_alias(self, address: str, targets: Sequence[str]) -> None:
        raise NotImplementedError

    async def remove_alias(self, address: str) -> bool:
        raise NotImplementedError

    async def get_alias(self, address: str) -> list[str] | None:
        raise NotImplementedError

    async def list_aliases(self) -> dict[str, list[str]]:
        raise NotImplementedError

    async def greylist_lookup(
        self, triplet: str, client_network: str
    ) -> tuple[TripletRecord | None, ClientNetworkRecord | None]:
        self._check("greylist_lookup")
        return self.triplets.get(triplet), self.networks.get(client_network)

    async def greylist_update(
        self,
        triplet: str,
        record: TripletRecord | None,
        client_network: str,
        network_record: ClientNetworkRecord | None,
        ttl: float,
    ) -> None:
        self._check("greylist_update")
        if record is not None:
            self.triplets[triplet] = record
        if network_record is not None:
            self.networks[client_network] = network_record

    async def greylist_triplets(self, limit: int = 1000) -> list[tuple[str, TripletRecord]]:
        raise NotImplementedError

    async def greylist_client_networks(
        self, limit: int = 1000
    ) -> list[tuple[str, ClientNetworkRecord]]:
        raise NotImplementedError

    async def greylist_delete(self, triplet_prefix: str = "") -> int:
        raise NotImplementedError

    async def greylist_purge_expired(self, now: float, expiry: float) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        return None
