"""DNSBL scoring: every zone asked in parallel under one time budget, weighted as postscreen does.

A client's score is the sum of the weights of the `[[dnsbl.zones]]` entries whose zone
answered with a return code inside the entry's filter. What never counts:
- NXDOMAIN (not listed), a timeout (not listed, logged), any DNS error (logged);
- answers in 127.255.255.0/24: DNSBLs such as Spamhaus answer 127.255.255.254 when the
  query came through a public or unregistered resolver. Counting those would reject every
  client (postscreen's lesson), so they are logged once per zone as "resolver refused".

Answers and NXDOMAINs are cached by their TTL (negative TTL from the SOA, else a short
default) on an injected clock, in a bounded LRU.

A zone that lists 127.0.0.1 is broken or hostile (RFC 5782 section 5: a list MUST NOT list
it; lists that were shut down, or whose domain lapsed, have answered every query): its
answers are not counted, with one ERROR line when that starts and one WARNING when it
ends. A zone's 127.0.0.1 is asked again, in parallel with a client's lookup and within
the same budget, whenever the last answer to it is PROBE_INTERVAL old: the request it
rides on is judged by that answer, and a list that turns wildcard can refuse mail for at
most that long. No background task, so nothing is asked while no mail comes in.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
# RFC 5782 section 5's test point that no list may list, as a query label (127.0.0.1).
PROBE_LABEL = "1.0.0.127"
# How old a zone's last answer about 127.0.0.1 may be before a request asks again: the
# longest a list that starts listing everything can refuse mail, for one extra query per
# zone per interval (none while no mail comes in).
PROBE_INTERVAL = 10.0

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
    disabled: tuple[str, ...] = ()  # zones not counted: they list 127.0.0.1

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

    def drop_zone(self, zone: str) -> None:
        """Forget every answer of one zone (it turned out broken, or stopped being so)."""
        for key in [key for key in self._items if key[0] == zone]:
            del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class _ZoneTimeout(Exception):
    pass


class _ZoneError(Exception):
    pass


@dataclass(slots=True)
class _ZoneHealth:
    """What a zone said about 127.0.0.1 (RFC 5782's "must not be listed"), and when."""

    broken: bool = False
    probed_at: float | None = None  # when the last probe ended (answered or not)
    probe: asyncio.Task[None] | None = None  # the probe in flight, shared by requests


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
        self._health = {zone: _ZoneHealth() for zone in self._zones}
        # Counters for metrics and tests: DNS queries sent about clients, answers served from
        # cache, and 127.0.0.1 probes sent.
        self.queries = 0
        self.cache_hits = 0
        self.probes = 0

    async def check(self, ip: str) -> DnsblResult:
        """Score one client; never raises for DNS trouble (it counts as not listed)."""
        try:
            label = query_label(ip)
        except DnsblError as exc:
            log.info("dnsbl: skipped: %s", exc)
            return DnsblResult(errors=(str(exc),))
        now = self._clock()
        answers: dict[str, tuple[str, ...]] = {}
        to_ask: list[str] = []
        probes: list[asyncio.Task[None]] = []
        started: list[asyncio.Task[None]] = []
        for zone in self._zones:
            health = self._health[zone]
            if health.probed_at is None or now - health.probed_at >= PROBE_INTERVAL:
                probe, new = self._probe_task(zone)
                probes.append(probe)
                if new:
                    started.append(probe)
            elif health.broken:
                continue  # not asked until the next probe says it behaves again
            cached = None if health.broken else self._cache.get((zone, label))
            if cached is None:
                to_ask.append(zone)
            else:
                self.cache_hits += 1
                answers[zone] = cached
        timed_out: list[str] = []
        errors: list[str] = []
        if to_ask or probes:
            found, timed_out, errors = await self._ask(label, to_ask, probes, started)
            answers.update(found)
        # Decided after the wait: a probe of this batch may just have found a zone broken.
        disabled = tuple(zone for zone in self._zones if self._health[zone].broken)
        for zone in disabled:
            answers.pop(zone, None)
        timed_out = [zone for zone in timed_out if zone not in disabled]
        errors = [e for e in errors if e.partition(":")[0] not in disabled]
        result = score_answers(self.cfg.zones, answers, timed_out, errors, self._ranges)
        if disabled:
            result = dataclasses.replace(result, disabled=disabled)
        self._log(ip, result)
        return result

    async def _ask(
        self,
        label: str,
        zones: list[str],
        probes: list[asyncio.Task[None]],
        started: list[asyncio.Task[None]],
    ) -> tuple[dict[str, tuple[str, ...]], list[str], list[str]]:
        budget = self.cfg.budget
        tasks = {
            zone: asyncio.ensure_future(
                self._lookup(zone, label, budget, cache=not self._health[zone].broken)
            )
            for zone in zones
        }
        waited: list[asyncio.Future[Any]] = [*tasks.values(), *probes]
        _, pending = await asyncio.wait(waited, timeout=budget)
        # A probe another request started is left to that request's budget; one started here
        # had this budget and ends with it, so none outlives the requests that wait for it.
        cancelled = [t for t in (*tasks.values(), *started) if t in pending]
        for task in cancelled:
            task.cancel()
        if cancelled:
            await asyncio.gather(*cancelled, return_exceptions=True)
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
        for probe in probes:
            # _probe absorbs DNS trouble; anything else is a bug, raised like a lookup's.
            error = probe.exception() if probe.done() and not probe.cancelled() else None
            if error is not None:
                raise error
        return found, timed_out, errors

    def _probe_task(self, zone: str) -> tuple[asyncio.Task[None], bool]:
        """The zone's probe in flight, or a new one; True when it was started now."""
        health = self._health[zone]
        if health.probe is not None and not health.probe.done():
            return health.probe, False
        health.probe = asyncio.ensure_future(self._probe(zone))
        return health.probe, True

    async def _probe(self, zone: str) -> None:
        """Ask the zone about 127.0.0.1 and disable or enable it by the answer."""
        health = self._health[zone]
        self.probes += 1
        try:
            codes, _ = await self._resolve(f"{PROBE_LABEL}.{zone}.", self.cfg.budget)
        except (_ZoneTimeout, _ZoneError):
            return  # no answer says nothing about the list: it stays as it was
        finally:
            # Also when unanswered or cancelled: a zone that never answers is not asked
            # again on every request.
            health.probed_at = self._clock()
        # A refusal (127.255.255.x) is about our resolver, not a listing of 127.0.0.1.
        listed = [code for code in codes if not is_refusal(code)]
        if listed and not health.broken:
            health.broken = True
            self._cache.drop_zone(zone)
            log.error(
                "dnsbl: %s lists 127.0.0.1 (answered %s), which no working list does"
                " (RFC 5782 section 5): a broken or hostile list that would block every"
                " client; its answers are not counted until it stops (asked every %gs)",
                zone,
                ", ".join(listed),
                PROBE_INTERVAL,
            )
        elif not listed and health.broken:
            health.broken = False
            self._cache.drop_zone(zone)  # answers it gave while broken, still in flight
            log.warning("dnsbl: %s no longer lists 127.0.0.1: its answers count again", zone)

    async def _lookup(
        self, zone: str, label: str, lifetime: float, *, cache: bool = True
    ) -> tuple[str, ...]:
        self.queries += 1
        codes, ttl = await self._resolve(f"{label}.{zone}.", lifetime)
        if cache:
            self._cache.put((zone, label), codes, ttl)
        return codes

    async def _resolve(self, qname: str, lifetime: float) -> tuple[tuple[str, ...], float]:
        """The A records of qname (empty: not listed) and how long they may be cached."""
        try:
            answer = await self.resolver.resolve(
                qname, "A", lifetime=lifetime, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return (), _negative_ttl(exc)
        except dns.exception.Timeout as exc:
            raise _ZoneTimeout from exc
        except dns.exception.DNSException as exc:
            # SERVFAIL from every server, REFUSED, a malformed reply: not listed, not cached.
            raise _ZoneError(type(exc).__name__) from exc
        if answer.rrset is None:
            # The name exists without an A record (e.g. only TXT): not listed.
            return (), NEGATIVE_TTL_DEFAULT
        return tuple(sorted(rdata.address for rdata in answer.rrset)), float(answer.rrset.ttl)

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
