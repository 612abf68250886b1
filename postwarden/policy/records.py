"""The domain records the policy checks, the store and the CLI exchange.

Plain values with no behaviour: the store persists them, the pure list and greylist code
reads them, so neither imports the other (docs/ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class ListName(StrEnum):
    PERMITTED = "permitted"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True, slots=True)
class ListEntry:
    """One permitted/forbidden entry, already in canonical form (postwarden.policy.list_entries)."""

    list_name: ListName
    entry: str
    comment: str = ""


@dataclass(frozen=True, slots=True)
class ListChange:
    """One change in the lists' change log; `seq` increases by one per change."""

    seq: int
    op: Literal["add", "remove"]
    entry: ListEntry


@dataclass(frozen=True, slots=True)
class TripletRecord:
    """Greylist state of one (client network, sender, recipient) triplet."""

    first_seen: float  # when the triplet was first deferred
    last_seen: float
    passes: int = 0  # messages accepted for this triplet after the delay


@dataclass(frozen=True, slots=True)
class ClientNetworkRecord:
    """Auto-whitelist state of one client network."""

    passes: int
    last_seen: float
