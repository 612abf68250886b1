"""Permitted/forbidden list entries: parsing to one canonical form, and an in-memory matcher.

Canonical forms (what the store holds and `parse_entry` returns):

- IPv4/IPv6 host: `192.0.2.1`, `2001:db8::1` (IPv4-mapped IPv6 becomes IPv4)
- network: `10.0.0.0/8`, `2001:db8::/32` (host bits cleared; /32 and /128 become hosts)
- mailbox: `j.smith@test.com` (lower-cased)
- domain: `example.com` (that domain exactly) or `.example.com` (its subdomains only)

`ListIndex` answers membership in time that depends on the number of distinct prefix
lengths present (at most 33 + 129) and on the labels of a domain, never on how many
entries the list holds.

Contract: docs/ARCHITECTURE.md, "Precedence".
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from postwarden.policy.records import ListChange, ListEntry, ListName
from postwarden.syntax.domain_names import DomainNameError, parse_domain_name
from postwarden.syntax.ip_addresses import IPAddress, unmapped
from postwarden.syntax.networks import NetworkSyntaxError, parse_network

log = logging.getLogger(__name__)

_V4_BITS = 32
_V6_BITS = 128
_V4_MASKS = tuple(((1 << _V4_BITS) - 1) ^ ((1 << (_V4_BITS - n)) - 1) for n in range(33))
_V6_MASKS = tuple(((1 << _V6_BITS) - 1) ^ ((1 << (_V6_BITS - n)) - 1) for n in range(129))
_MAPPED_PREFIX = 0xFFFF  # ::ffff:0:0/96, the IPv4-mapped block, shifted right by 32 bits

_ALLOWED = (
    "allowed: an IPv4/IPv6 address, a network (10.0.0.0/8, 2001:db8::/32), "
    "addr:mask (192.168.2.0:255.255.255.0), an IPv4 wildcard (192.168.1.*), "
    "a mailbox (j.smith@test.com), a domain (example.com) or its subdomains (.example.com)"
)
_MAX_ENTRY = 320  # 64 (local part) + 1 + 253 (domain) + slack; longer is never an address
_MAX_LOCAL = 64


class InvalidEntry(ValueError):
    """A list entry in no form we accept; the message says why and what is allowed."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message  # the "why" alone, for line-by-line reports


def _invalid(text: str, why: str) -> InvalidEntry:
    return InvalidEntry(f"{text!r}: {why} ({_ALLOWED})", why)


def parse_entry(text: str) -> str:
    """The canonical form of one list entry; raise InvalidEntry saying why it is refused."""
    entry = text.strip()
    if not entry:
        raise _invalid(text, "empty entry")
    if len(entry) > _MAX_ENTRY:
        raise _invalid(entry[:40] + "...", f"longer than {_MAX_ENTRY} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in entry):
        raise _invalid(entry, "contains a space or a control character")
    if "@" in entry:
        return _parse_mailbox(entry)
    if "*" in entry or "/" in entry or ":" in entry:
        return _parse_network(entry)
    if all(ch.isdigit() or ch == "." for ch in entry):
        return _parse_network(entry)
    return _parse_domain(entry, entry)


def _parse_network(entry: str) -> str:
    """Canonical text of an address or network entry, read by the one network grammar."""
    try:
        network = parse_network(entry)
    except NetworkSyntaxError as exc:
        raise _invalid(entry, str(exc)) from None
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _parse_mailbox(entry: str) -> str:
    local, _, domain = entry.rpartition("@")
    if not local:
        raise _invalid(entry, "a mailbox needs a local part before '@'")
    if len(local) > _MAX_LOCAL:
        raise _invalid(entry, f"the local part is longer than {_MAX_LOCAL} characters")
    if not domain:
        raise _invalid(entry, "a mailbox needs a domain after '@'")
    if domain.startswith("."):
        raise _invalid(entry, "a mailbox's domain cannot start with '.'")
    return f"{local.lower()}@{_parse_domain(domain, entry)}"


def _parse_domain(text: str, entry: str) -> str:
    """`example.com` or `.example.com`; the label rule is the one of every DNS name."""
    subdomains = text.startswith(".")
    try:
        name = parse_domain_name(text[1:] if subdomains else text, underscore=True)
    except DomainNameError as exc:
        raise _invalid(entry, str(exc)) from None
    if not subdomains and "." not in name:
        raise _invalid(entry, "a domain needs at least one dot; use .tld for a whole TLD")
    return f".{name}" if subdomains else name


@dataclass(slots=True)
class _PrefixTable:
    """Networks of one address family: per prefix length, the set of network integers."""

    bits: int
    masks: tuple[int, ...]
    by_length: dict[int, set[int]] = field(default_factory=dict)
    # The lengths present, longest first; rebuilt only when a length appears or vanishes.
    lengths: tuple[int, ...] = ()

    def add(self, network: int, length: int) -> bool:
        nets = self.by_length.get(length)
        if nets is None:
            nets = self.by_length[length] = set()
            self.lengths = tuple(sorted(self.by_length, reverse=True))
        before = len(nets)
        nets.add(network)
        return len(nets) != before

    def remove(self, network: int, length: int) -> bool:
        nets = self.by_length.get(length)
        if nets is None or network not in nets:
            return False
        nets.discard(network)
        if not nets:
            del self.by_length[length]
            self.lengths = tuple(sorted(self.by_length, reverse=True))
        return True

    def contains(self, address: int) -> bool:
        masks = self.masks
        by_length = self.by_length
        # A plain loop, not any(<generator>): this is the hot path of every request.
        for length in self.lengths:  # noqa: SIM110
            if address & masks[length] in by_length[length]:
                return True
        return False


def _address_int(text: str) -> tuple[int, int] | None:
    """(version, integer) of an address string, IPv4-mapped IPv6 as IPv4; None if invalid."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        pass
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):
        return None
    if value >> 32 == _MAPPED_PREFIX:
        return 4, value & 0xFFFFFFFF
    return 6, value


class ListIndex:
    """One list (permitted or forbidden), compiled for lookups whose cost ignores its size."""

    __slots__ = ("_domains", "_mailboxes", "_subdomains", "_v4", "_v6")

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self._v4 = _PrefixTable(_V4_BITS, _V4_MASKS)
        self._v6 = _PrefixTable(_V6_BITS, _V6_MASKS)
        self._mailboxes: set[str] = set()
        self._domains: set[str] = set()
        self._subdomains: set[str] = set()  # parent domains, stored without the dot
        for entry in entries:
            self.add(entry)

    def __len__(self) -> int:
        networks = sum(len(s) for s in self._v4.by_length.values()) + sum(
            len(s) for s in self._v6.by_length.values()
        )
        return networks + len(self._mailboxes) + len(self._domains) + len(self._subdomains)

    @property
    def prefix_lengths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The IPv4 and IPv6 prefix lengths present: what one IP lookup iterates over."""
        return self._v4.lengths, self._v6.lengths

    def _network(self, canonical: str) -> tuple[_PrefixTable, int, int]:
        address, _, prefix_text = canonical.partition("/")
        parsed = _address_int(address)
        if parsed is None or (prefix_text and not prefix_text.isdigit()):
            raise InvalidEntry(f"{canonical!r} is not a canonical list entry")
        version, value = parsed
        table = self._v4 if version == 4 else self._v6
        length = int(prefix_text) if prefix_text else table.bits
        if length > table.bits or value & table.masks[length] != value:
            raise InvalidEntry(f"{canonical!r} is not a canonical list entry")
        return table, value, length

    def _target(self, canonical: str) -> tuple[set[str], str] | None:
        """The hash set a name entry lives in, or None for an IP entry."""
        if "@" in canonical:
            return self._mailboxes, canonical
        if canonical.startswith("."):
            return self._subdomains, canonical[1:]
        # An IP entry is IPv6 (a colon) or only digits, dots and a /prefix; a domain may end
        # in a digit (mail.host1), just not in an all-digit label, which parse_entry refuses.
        if ":" in canonical or canonical.replace(".", "").replace("/", "").isdigit():
            return None
        return self._domains, canonical

    def add(self, canonical: str) -> bool:
        """Add one entry in canonical form (as parse_entry returns it); True if it was new."""
        target = self._target(canonical)
        if target is not None:
            names, key = target
            before = len(names)
            names.add(key)
            return len(names) != before
        table, value, length = self._network(canonical)
        return table.add(value, length)

    def remove(self, canonical: str) -> bool:
        """Remove one entry; True if it was present."""
        target = self._target(canonical)
        if target is not None:
            names, key = target
            if key in names:
                names.discard(key)
                return True
            return False
        table, value, length = self._network(canonical)
        return table.remove(value, length)

    def contains_ip(self, ip: str | IPAddress) -> bool:
        """Whether a client address falls in an address/network entry (IPv4-mapped as IPv4)."""
        if isinstance(ip, str):
            parsed = _address_int(ip)
            if parsed is None:
                return False
            version, value = parsed
        else:
            address = unmapped(ip)
            version, value = address.version, int(address)
        return (self._v4 if version == 4 else self._v6).contains(value)

    def contains_mailbox(self, addr: str) -> bool:
        """Whether a sender mailbox (any case) is an entry."""
        return bool(addr) and addr.lower() in self._mailboxes

    def contains_domain(self, domain: str) -> bool:
        """Whether `domain` is an exact entry, or a proper subdomain of a `.parent` entry."""
        name = domain.lower().rstrip(".")
        if not name:
            return False
        if name in self._domains:
            return True
        if not self._subdomains:
            return False
        # Walk up the labels: a.b.example.com checks b.example.com, example.com, com.
        dot = name.find(".")
        while dot != -1:
            name = name[dot + 1 :]
            if name in self._subdomains:
                return True
            dot = name.find(".")
        return False


@dataclass(slots=True)
class CompiledLists:
    """Both lists, compiled; kept current by applying the store's change log."""

    permitted: ListIndex = field(default_factory=ListIndex)
    forbidden: ListIndex = field(default_factory=ListIndex)

    @classmethod
    def from_entries(cls, entries: Iterable[ListEntry]) -> CompiledLists:
        """Compile every entry; an entry not in canonical form is logged and skipped."""
        lists = cls()
        for entry in entries:
            lists._change("add", entry)
        return lists

    def index(self, list_name: ListName) -> ListIndex:
        return self.permitted if list_name is ListName.PERMITTED else self.forbidden

    def apply(self, changes: Iterable[ListChange]) -> None:
        """Apply changes in order; adding a present entry or removing an absent one is a no-op."""
        for change in changes:
            self._change(change.op, change.entry)

    def _change(self, op: str, entry: ListEntry) -> None:
        index = self.index(ListName(entry.list_name))
        try:
            if op == "add":
                index.add(entry.entry)
            else:
                index.remove(entry.entry)
        except InvalidEntry as exc:
            # A hand-edited store must not stop the daemon; the entry simply cannot match.
            log.warning("skipping %s list entry: %s", entry.list_name, exc)


def sender_parts(sender: str) -> tuple[str, str]:
    """(mailbox, domain) of an envelope sender, lower-cased; the null sender has neither."""
    address = sender.strip().strip("<>").lower()
    if not address:
        return "", ""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    domain = domain.rstrip(".")
    if not local or not domain:
        return "", domain
    return f"{local}@{domain}", domain
