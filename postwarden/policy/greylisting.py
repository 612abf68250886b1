"""Greylisting (RFC 6647), pure: triplet keys, sender normalisation, large senders, decisions.

The caller looks the records up in the store, calls `decide` with the current time, and
writes back what the decision says; nothing here reads a clock, a socket or the store.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from email.utils import formatdate
from importlib import resources
from pathlib import Path

from postwarden.config.model import GreylistingConfig
from postwarden.policy.list_entries import InvalidEntry, ListIndex, parse_entry
from postwarden.policy.records import ClientNetworkRecord, TripletRecord
from postwarden.policy.verdict import Rule, Verdict, defer, dunno, prepend
from postwarden.syntax.ip_addresses import IPAddress, parse_client_ip, unmapped

HEADER_AGENT = "postwarden"
# How stale an auto-whitelisted network's last_seen may get before a pass rewrites it;
# tiny next to the expiry (days), so the record never lapses while the network is active.
NETWORK_TOUCH_INTERVAL = 300.0


class InvalidClientAddress(ValueError):
    """The client address is not an IP address (Postfix sends one for every SMTP client)."""


def client_network(ip: str | IPAddress, ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> str:
    """The client's network, e.g. `192.0.2.0/24`: clients of one pool retry from any address."""
    address = parse_client_ip(ip) if isinstance(ip, str) else unmapped(ip)
    if address is None:
        raise InvalidClientAddress(f"not an IP address: {ip!r}")
    # Masking the integer, not ip_network("a/p", strict=False): that parses the text
    # again, and this runs on every request. Same text as str(IPvXNetwork).
    if address.version == 4:
        net: IPAddress = ipaddress.IPv4Address(int(address) & _MASKS_V4[ipv4_prefix])
        return f"{net}/{ipv4_prefix}"
    net = ipaddress.IPv6Address(int(address) & _MASKS_V6[ipv6_prefix])
    return f"{net}/{ipv6_prefix}"


_MASKS_V4 = tuple(((1 << 32) - 1) ^ ((1 << (32 - p)) - 1) for p in range(33))
_MASKS_V6 = tuple(((1 << 128) - 1) ^ ((1 << (128 - p)) - 1) for p in range(129))


# SRS (Sender Rewriting Scheme, libsrs2): SRS0=HHH=TT=orig-domain=orig-local@forwarder and
# SRS1=HHH=first-forwarder==HHH=TT=orig-domain=orig-local@forwarder2.
_SRS0 = re.compile(r"srs0[=+-][^=]*=[^=]*=([^=]+)=(.+)")
_SRS1 = re.compile(r"srs1[=+-][^=]*=[^=]*==[^=]*=[^=]*=([^=]+)=(.+)")
# BATV (draft-levine-smtp-batv): prvs=TAG=local; also seen reversed (prvs=local=TAG),
# Barracuda's btv1==TAG==local and msprvs1=TAG=local. The tag changes with every message.
_BATV_TAG = r"[0-9a-f]{6,12}"
_BATV = re.compile(rf"(?:ms)?prvs\d?={_BATV_TAG}=(.+)")
_BATV_REVERSED = re.compile(rf"prvs=(.+)={_BATV_TAG}")
_BTV1 = re.compile(r"btv1==[0-9a-z]+==(.+)")
# VERP-style numbers as postgrey treats them: each whole number stands for any number.
_NUMBER = re.compile(r"\b\d+\b")


def normalise_sender(sender: str) -> str:
    """The sender as greylisting keys it: lower-cased, SRS undone, BATV/VERP tags removed.

    Bulk senders vary these per message; keying on the raw address would greylist every
    message of a retrying sender anew.
    """
    address = sender.strip().strip("<>").lower()
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return address
    for _ in range(3):  # SRS may wrap BATV (and, rarely, SRS again); bounded, never a loop
        srs = _SRS0.fullmatch(local) or _SRS1.fullmatch(local)
        if srs is not None:
            domain, local = srs.group(1), srs.group(2)
            continue
        batv = _BATV.fullmatch(local) or _BTV1.fullmatch(local) or _BATV_REVERSED.fullmatch(local)
        if batv is not None:
            local = batv.group(1)
            continue
        break
    # postgrey's VERP handling: drop a +extension, then turn numbers into '#'.
    base = local.split("+", 1)[0] or local
    return f"{_NUMBER.sub('#', base)}@{domain}"


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """The store key of one triplet; the client network comes first so it can be a prefix."""
    return f"{network} {sender.lower()} {recipient.lower()}"


class LargeSendersError(ValueError):
    """A line of the large-senders file in no form we accept."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}, line {line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LargeSenders:
    """Senders exempt from greylisting: big pools that retry from ever-changing addresses."""

    index: ListIndex  # networks, and hostnames: `name` exact, `.name` its subdomains
    patterns: tuple[re.Pattern[str], ...] = ()  # `/regex/` lines, searched in the hostname

    def matches(self, client_name: str, client_ip: str) -> bool:
        """Whether the (verified) client hostname or the client address is listed."""
        if self.index.contains_ip(client_ip):
            return True
        name = client_name.lower().rstrip(".")
        if not name or name == "unknown":  # Postfix's word for "no verified name"
            return False
        return self.index.contains_domain(name) or any(p.search(name) for p in self.patterns)


def parse_large_senders(text: str, path: str = "<large senders>") -> LargeSenders:
    """Parse the large-senders format; raise LargeSendersError naming the line and why."""
    index = ListIndex()
    patterns: list[re.Pattern[str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if not line:
            continue
        if line.startswith("/"):
            if len(line) < 3 or not line.endswith("/"):
                raise LargeSendersError(path, number, f"{line!r}: a regex is written /pattern/")
            try:
                patterns.append(re.compile(line[1:-1], re.IGNORECASE))
            except re.error as exc:
                raise LargeSendersError(path, number, f"{line!r}: bad regex: {exc}") from None
            continue
        try:
            entry = parse_entry(line)
        except InvalidEntry as exc:
            raise LargeSendersError(
                path,
                number,
                f"{line!r}: {exc.reason}; expected a hostname "
                "(mail.example.com), its subdomains (.example.com), a network or /regex/",
            ) from None
        if "@" in entry:
            raise LargeSendersError(path, number, f"{line!r}: a mailbox is not a client")
        index.add(entry)
    return LargeSenders(index, tuple(patterns))


def load_large_senders(path: Path | None = None) -> LargeSenders:
    """Read a large-senders file; None reads the list shipped with postwarden."""
    if path is None:
        shipped = resources.files("postwarden.policy").joinpath("data/large_senders.txt")
        return parse_large_senders(shipped.read_text(encoding="utf-8"), "large_senders.txt")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LargeSendersError(str(path), 0, f"cannot read: {exc}") from None
    return parse_large_senders(text, str(path))


@dataclass(frozen=True, slots=True)
class GreylistDecision:
    """What greylisting answers, and which records the caller must write (None: leave it)."""

    verdict: Verdict
    triplet_record: TripletRecord | None = None
    network_record: ClientNetworkRecord | None = None


def decide(
    triplet: TripletRecord | None,
    network: ClientNetworkRecord | None,
    now: float,
    cfg: GreylistingConfig,
    *,
    exempt: bool,
) -> GreylistDecision:
    """The greylisting verdict for one delivery attempt, given the stored state and the time."""
    if exempt:
        return GreylistDecision(dunno(Rule.GREYLIST_EXEMPT))
    # A record lives `expiry` seconds after it was last seen and is gone at that instant:
    # the store writes it with ttl=expiry and drops it once the ttl has run out, so `<`
    # here keeps this function and the store of one mind at the boundary.
    known = network if network is not None and now - network.last_seen < cfg.expiry else None
    if known is not None and 0 < cfg.auto_whitelist_after <= known.passes:
        # Refresh last_seen (and so the record's TTL) now and then, not on every message:
        # a busy whitelisted network would otherwise cost a store write per request.
        fresh = now - known.last_seen < NETWORK_TOUCH_INTERVAL
        touched = None if fresh else ClientNetworkRecord(known.passes, now)
        return GreylistDecision(dunno(Rule.GREYLIST_KNOWN), network_record=touched)
    deferred = defer(Rule.GREYLIST_DEFER, cfg.defer_text)
    if (
        triplet is None
        or now - triplet.last_seen >= cfg.expiry
        or (triplet.passes == 0 and now > triplet.first_seen + cfg.delay + cfg.retry_window)
    ):
        # New, forgotten, or a retry that came too late: the delay starts (again) now.
        return GreylistDecision(deferred, TripletRecord(now, now, 0))
    if triplet.passes == 0 and now < triplet.first_seen + cfg.delay:
        # An early retry: still deferred, and the delay still counts from the first attempt.
        return GreylistDecision(deferred, TripletRecord(triplet.first_seen, now, 0))
    passed = TripletRecord(triplet.first_seen, now, triplet.passes + 1)
    network_passed = ClientNetworkRecord((known.passes if known else 0) + 1, now)
    if triplet.passes > 0:
        return GreylistDecision(dunno(Rule.GREYLIST_KNOWN), passed, network_passed)
    if not cfg.add_header:
        return GreylistDecision(dunno(Rule.GREYLIST_PASS), passed, network_passed)
    delayed = round(now - triplet.first_seen)
    header = (
        f"X-Greylist: delayed {delayed} seconds by {HEADER_AGENT}; "
        f"{formatdate(now, localtime=False, usegmt=True)}"
    )
    return GreylistDecision(prepend(Rule.GREYLIST_PASS, header), passed, network_passed)
