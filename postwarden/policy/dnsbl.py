"""DNSBL scoring: every zone asked in parallel under one time budget, weighted as postscreen does.

A client's score is the sum of the weights of the `[[dnsbl.zones]]` entries whose zone
answered with a return code inside the entry's filter. What never counts:
- NXDOMAIN (not listed), a timeout (not listed, logged), any DNS error (logged);
- answers in 127.255.255.0/24: DNSBLs such as Spamhaus answer 127.255.255.254 when the
  query came through a public or unregistered resolver. Counting those would reject every
  client (postscreen's lesson), so they are logged once per zone as "resolver refused".

Answers and NXDOMAINs are cached by their TTL (negative TTL from the SOA, else a short
default) on an injected clock, in a bounded LRU.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from postwarden.config.model import DnsblConfig, DnsblZone
from postwarden.policy.verdict import Rule, Verdict, reject
from postwarden.syntax.ip_addresses import parse_client_ip
from postwarden.syntax.networks import parse_ipv4_range

log = logging.getLogger("postwarden.policy.dnsbl")

# Any 127.0.0.0/8 answer is a listing unless a zone's `codes` says otherwise (RFC 5782 2.1).
LISTED_RANGE = (
    int(ipaddress.IPv4Address("127.0.0.0")),
    int(ipaddress.IPv4Address("127.255.255.255")),
)
REFUSED_NETWORK = ipaddress.IPv4Network("127.255.255.0/24")

CACHE_SIZE = 100_000  # (zone, client) answers kept
MAX_CACHE_TTL = 3600.0  # a zone's long TTL must not keep a delisted client blocked for days
NEGATIVE_TTL_DEFAULT = 60.0  # NXDOMAIN without a usable SOA
LOG_INTERVAL = 60.0  # at most one "timed out" / "error" line per zone per interval

Clock = Callable[[], float]


class DnsblError(ValueError):
    """A client address that cannot be looked up (not an IP address)."""


@dataclass(frozen=True, slots=True)
class DnsblResult:
    """What the DNSBLs said about one client."""

    score: int = 0
    listed: tuple[tuple[str, str], ...] = ()  # (zone, return code) that counted
    timed_out: tuple[str, ...] = ()  # zones that had not answered within the budget
    errors: tuple[str, ...] = ()  # "zone: reason" for answers that did not count

    @property
    def zones(self) -> tuple[str, ...]:
        """The zones that listed the client, each once, in config order."""
        return tuple(dict.fromkeys(zone for zone, _ in self.listed))


# -- pure parts ------------------------------------------------------------------------


def query_label(ip: str) -> str:
    """The reversed-address label a DNSBL is asked for (RFC 5782 2.1 and 2.4).

    IPv4: reversed octets. IPv6: reversed nibbles. IPv4-mapped IPv6 is looked up as IPv4.
    """
    address = parse_client_ip(ip)
    if address is None:
        raise DnsblError(f"not an IP address: {ip!r}")
    if isinstance(address, ipaddress.IPv4Address):
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


def parse_codes(codes: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """`["127.0.0.2", "127.0.0.4-127.0.0.11", "127.0.1.0/24"]` as inclusive integer ranges.

    Empty: any 127/8 answer.
    """
    # The grammar `[dnsbl] zones.codes` was validated with, so a checked config parses here.
    return tuple(parse_ipv4_range(code) for code in codes) or (LISTED_RANGE,)


def is_refusal(code: str) -> bool:
    """True for 127.255.255.x: the DNSBL refused the query, it did not list the client."""
    try:
        return ipaddress.IPv4Address(code) in REFUSED_NETWORK
    except ValueError:
        return False


def matching_codes(answers: Sequence[str], ranges: Sequence[tuple[int, int]]) -> list[str]:
    """The answers inside the filter ranges; refusals and non-IPv4 answers never match."""
    found = []
    for code in answers:
        if is_refusal(code):
            continue
        try:
            value = int(ipaddress.IPv4Address(code))
        except ValueError:
            continue
        if any(lo <= value <= hi for lo, hi in ranges):
            found.append(code)
    return found


def score_answers(
    entries: Sequence[DnsblZone],
    answers: dict[str, tuple[str, ...]],
    timed_out: Sequence[str] = (),
    errors: Sequence[str] = (),
    ranges: Sequence[tuple[tuple[int, int], ...]] | None = None,
) -> DnsblResult:
    """Sum the weights of the entries whose zone answered a code inside their filter.

    `answers` maps a zone to its A records (empty: NXDOMAIN). An entry counts once however
    many of its codes matched; the same zone may appear in several entries, as in postscreen.
    `ranges` are the entries' parsed code filters, when the caller parsed them once already.
    """
    if ranges is None:
        ranges = [parse_codes(entry.codes) for entry in entries]
    score = 0
    listed: list[tuple[str, str]] = []
    problems = list(errors)
    for entry, entry_ranges in zip(entries, ranges, strict=True):
        codes = answers.get(entry.zone.lower().rstrip("."), ())
        refused = [c for c in codes if is_refusal(c)]
        if refused:
            problems.append(f"{entry.zone}: resolver refused ({', '.join(refused)})")
        matched = matching_codes(codes, entry_ranges)
        if matched:
            score += entry.weight
            listed.extend((entry.zone, code) for code in matched)
    return DnsblResult(
        score=score,
        listed=tuple(dict.fromkeys(listed)),
        timed_out=tuple(timed_out),
        errors=tuple(dict.fromkeys(problems)),
    )


def verdict_for(result: DnsblResult, cfg: DnsblConfig) -> Verdict | None:
    """554 5.7.1 naming the zones when the score reaches the threshold; else no opinion."""
    if result.score < cfg.threshold or not result.listed:
        return None
    return reject(Rule.DNSBL, f"{cfg.reject_text}: {', '.join(result.zones)}", 554, "5.7.1")


# -- the lookups -----------------------------------------------------------------------


class _Cache:
    """A bounded LRU of (zone, label) -> (expires at, answers) on an injected clock."""

    def __init__(self, clock: Clock, size: int) -> None:
        self._clock = clock
        self._size = size
        self._items: OrderedDict[tuple[str, str], tuple[float, tuple[str, ...]]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> tuple[str, ...] | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, answers = item
        if self._clock() >= expires:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return answers

    def put(self, key: tuple[str, str], answers: tuple[str, ...], ttl: float) -> None:
        ttl = min(ttl, MAX_CACHE_TTL)
        if ttl <= 0:
            return
        self._items[key] = (self._clock() + ttl, answers)
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class _ZoneTimeout(Exception):
    pass


class _ZoneError(Exception):
    pass


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """RFC 2308: an NXDOMAIN may be cached for min(SOA TTL, SOA minimum)."""
    # dnspython leaves these two accessors unannotated.
    nx: Any = exc
    try:
        response = nx.response(nx.qnames()[0])
    except (KeyError, IndexError):
        return NEGATIVE_TTL_DEFAULT
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL_DEFAULT


class DnsblChecker:
    """Asks every configured zone about a client, in parallel, within `cfg.budget`."""

    def __init__(
        self,
        cfg: DnsblConfig,
        resolver: dns.asyncresolver.Resolver,
        clock: Clock = time.monotonic,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.cfg = cfg
        self.resolver = resolver
        self._clock = clock
        self._cache = _Cache(clock, cache_size)
        self._zones = tuple(dict.fromkeys(z.zone.lower().rstrip(".") for z in cfg.zones))
        # Parsed once here, not on every request.
        self._ranges = tuple(parse_codes(z.codes) for z in cfg.zones)
        self._refusal_logged: set[str] = set()
        self._last_logged: dict[tuple[str, str], float] = {}
        # Counters for metrics and tests: DNS queries sent, and answers served from cache.
        self.queries = 0
        self.cache_hits = 0

    async def check(self, ip: str) -> DnsblResult:
        """Score one client; never raises for DNS trouble (it counts as not listed)."""
        try:
            label = query_label(ip)
        except DnsblError as exc:
            log.info("dnsbl: skipped: %s", exc)
            return DnsblResult(errors=(str(exc),))
        answers: dict[str, tuple[str, ...]] = {}
        to_ask: list[str] = []
        for zone in self._zones:
            cached = self._cache.get((zone, label))
            if cached is None:
                to_ask.append(zone)
            else:
                self.cache_hits += 1
                answers[zone] = cached
        timed_out: list[str] = []
        errors: list[str] = []
        if to_ask:
            found, timed_out, errors = await self._ask(label, to_ask)
            answers.update(found)
        result = score_answers(self.cfg.zones, answers, timed_out, errors, self._ranges)
        self._log(ip, result)
        return result

    async def _ask(
        self, label: str, zones: list[str]
    ) -> tuple[dict[str, tuple[str, ...]], list[str], list[str]]:
        budget = self.cfg.budget
        tasks = {zone: asyncio.ensure_future(self._lookup(zone, label, budget)) for zone in zones}
        _, pending = await asyncio.wait(tasks.values(), timeout=budget)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        found: dict[str, tuple[str, ...]] = {}
        timed_out: list[str] = []
        errors: list[str] = []
        for zone, task in tasks.items():
            if task in pending:
                timed_out.append(zone)
                continue
            exc = task.exception()
            if isinstance(exc, _ZoneTimeout):
                timed_out.append(zone)
            elif isinstance(exc, _ZoneError):
                errors.append(f"{zone}: {exc}")
            elif exc is not None:
                raise exc
            else:
                found[zone] = task.result()
        return found, timed_out, errors

    async def _lookup(self, zone: str, label: str, lifetime: float) -> tuple[str, ...]:
        qname = f"{label}.{zone}."
        self.queries += 1
        try:
            answer = await self.resolver.resolve(
                qname, "A", lifetime=lifetime, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            self._cache.put((zone, label), (), _negative_ttl(exc))
            return ()
        except dns.exception.Timeout as exc:
            raise _ZoneTimeout from exc
        except dns.exception.DNSException as exc:
            # SERVFAIL from every server, REFUSED, a malformed reply: not listed, not cached.
            raise _ZoneError(type(exc).__name__) from exc
        if answer.rrset is None:
            # The name exists without an A record (e.g. only TXT): not listed.
            codes: tuple[str, ...] = ()
            ttl = NEGATIVE_TTL_DEFAULT
        else:
            codes = tuple(sorted(rdata.address for rdata in answer.rrset))
            ttl = float(answer.rrset.ttl)
        self._cache.put((zone, label), codes, ttl)
        return codes

    def _log(self, ip: str, result: DnsblResult) -> None:
        # A dead or misbehaving zone would otherwise log on every request.
        for zone in result.timed_out:
            if self._may_log(zone, "timeout"):
                log.warning(
                    "dnsbl: %s did not answer within %.1fs for client %s: counted as not listed",
                    zone,
                    self.cfg.budget,
                    ip,
                )
        for problem in result.errors:
            zone = problem.partition(":")[0]
            if "resolver refused" in problem:
                if zone not in self._refusal_logged:
                    self._refusal_logged.add(zone)
                    log.warning(
                        "dnsbl: %s; the zone refuses our resolver (use a local or registered"
                        " resolver); these answers are never counted",
                        problem,
                    )
            elif self._may_log(zone, "error"):
                log.warning("dnsbl: client %s: %s (counted as not listed)", ip, problem)

    def _may_log(self, zone: str, kind: str) -> bool:
        now = self._clock()
        last = self._last_logged.get((zone, kind))
        if last is not None and now - last < LOG_INTERVAL:
            return False
        self._last_logged[(zone, kind)] = now
        return True
