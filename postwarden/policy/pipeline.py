"""The I/O around the pure filtering order for one policy request (no sockets here).

`Pipeline.evaluate()` derives the request's facts once (`filtering_order.request_facts`),
asks `filtering_order.next_step()` what it needs, fetches that (DNSBL, SPF within its time
budget, the greylist records from the store), adds the answer to what is gathered and asks
again, until the order answers a `Decision`; then it writes the greylist records and
remembers the prepended header the decision names. The order itself, which header wins
and what a failure means live in `filtering_order.py` (docs/ARCHITECTURE.md, "Filtering
order").

Every recipient of one message gets its own request with the same `instance`, so the
headers already prepended for that instance are remembered here (a bounded LRU) and handed
to the order, which does not repeat them.

A store or DNS failure is handed to the order as `Unavailable` (it answers the configured
`policyd.default_action` with rule `default`); the request timeout and unexpected
exceptions give the same answer: mail is never refused by our fault. Each failure kind is
logged at most once per `FAILURE_LOG_INTERVAL`, with a traceback only for unexpected
exceptions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception

from postwarden.config.model import Config
from postwarden.policy import dnsbl, filtering_order, greylisting, spf_check
from postwarden.policy.filtering_order import (
    Decision,
    DnsblLookup,
    FilteringSettings,
    Gathered,
    GreylistRecords,
    Lookup,
    SpfLookup,
    Unavailable,
)
from postwarden.policy.live_lists import LiveLists
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Verdict
from postwarden.store.base import Store, StoreError

log = logging.getLogger("postwarden.policy.pipeline")

FAILURE_LOG_INTERVAL = 60.0  # seconds between log lines for one kind of failure
INSTANCE_MEMORY = 10_000  # messages whose prepended headers are remembered
# DNSBL, SPF, greylist lookup, a failed greylist write, the decision: the order never
# needs more steps; the bound only turns a bug into the default answer, never a hang.
MAX_STEPS = 8

RequestTimer = Callable[[float], asyncio.Timeout]

# One lookup the order asked for and what it found (the store's records, the DNSBL score,
# the SPF result, or Unavailable).
LookupAnswer = tuple[Lookup, object]


@dataclass(frozen=True)
class Explanation:
    """What `Pipeline.explain` found: the facts, each lookup in order, the decision."""

    facts: filtering_order.RequestFacts
    lookups: list[LookupAnswer]
    decision: Decision


class FailureLog:
    """Logs each kind of failure at most once per interval, counting what it held back."""

    def __init__(
        self, interval: float = FAILURE_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, kind: str, message: str, *, traceback: bool = False) -> None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        held = self._held.pop(kind, 0)
        self._last[kind] = now
        more = f" ({held} more since last logged)" if held else ""
        log.error(
            "policyd: %s failure, answering the default action: %s%s",
            kind,
            message,
            more,
            exc_info=traceback,
        )


def _unavailable(exc: StoreError | dns.exception.DNSException) -> Unavailable:
    kind = "store" if isinstance(exc, StoreError) else "dns"
    return Unavailable(kind, str(exc) or type(exc).__name__)


class Pipeline:
    """Judges one policy request at a time; safe to share across connections of one loop."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        lists: LiveLists,
        dnsbl_checker: dnsbl.DnsblChecker | None = None,
        spf_checker: spf_check.SpfChecker | None = None,
        large_senders: greylisting.LargeSenders | None = None,
        clock: Callable[[], float] = time.time,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        request_timer: RequestTimer = asyncio.timeout,
    ) -> None:
        self.store = store
        self.lists = lists
        self.clock = clock  # wall clock: greylist records outlive the process
        self.failures = FailureLog(clock=monotonic)
        # The request timeout as an async context manager (tests expire it by hand).
        self._request_timer = request_timer
        self._sent_headers: OrderedDict[str, set[str]] = OrderedDict()
        self.configure(cfg, dnsbl_checker, spf_checker, large_senders)
        # Called with the kind of each failure (metrics hook; set by the server).
        self.on_failure: Callable[[str], None] = lambda kind: None

    def configure(
        self,
        cfg: Config,
        dnsbl_checker: dnsbl.DnsblChecker | None,
        spf_checker: spf_check.SpfChecker | None,
        large_senders: greylisting.LargeSenders | None,
    ) -> None:
        """Swap in a (reloaded) config and the checkers built from it."""
        self.cfg = cfg
        self.dnsbl = dnsbl_checker if cfg.dnsbl.enabled else None
        self.spf = spf_checker if cfg.spf.enabled else None
        self.large_senders = large_senders
        self.settings = FilteringSettings.from_config(
            cfg,
            dnsbl=self.dnsbl is not None,
            spf=self.spf is not None,
            large_senders=large_senders,
        )
        self.default = self.settings.default
        self._timeout = cfg.policyd.request_timeout
        # Only DNS and a networked store can make a request wait; the SQLite store answers
        # synchronously, so without DNS checks the timeout (~12 µs a request) bounds nothing.
        self._bounded = not (
            self.dnsbl is None and self.spf is None and getattr(self.store, "synchronous", False)
        )
        checks = (cfg.dnsbl.budget if self.dnsbl else 0.0) + (cfg.spf.timeout if self.spf else 0.0)
        if checks >= self._timeout:
            # Slow DNS would then end requests in the default answer before greylisting runs.
            log.warning(
                "policyd.request_timeout (%gs) does not exceed dnsbl.budget + spf.timeout"
                " (%gs): slow DNS will make requests answer the default action",
                self._timeout,
                checks,
            )

    async def evaluate(self, request: PolicyRequest) -> Verdict:
        """The verdict for one request; never raises (failures give the default)."""
        return (await self._decide(request, None)).verdict

    async def explain(self, request: PolicyRequest) -> Explanation:
        """What `evaluate` would answer, with every lookup it made, writing nothing.

        The same order, lookups and time budget as a real request (`postwarden explain`),
        but no greylist record is written and no header remembered, so asking changes
        nothing of what policyd answers next."""
        lookups: list[LookupAnswer] = []
        decision = await self._decide(request, lookups)
        facts = filtering_order.request_facts(request, self.lists.current, self.settings)
        return Explanation(facts, lookups, decision)

    async def _decide(
        self, request: PolicyRequest, explained: list[LookupAnswer] | None
    ) -> Decision:
        traceback = False
        try:
            if not self._bounded:
                decision = await self._judge(request, explained)
            else:
                async with self._request_timer(self._timeout):
                    decision = await self._judge(request, explained)
        except TimeoutError:
            failure = Unavailable("timeout", f"no verdict within {self._timeout:g}s")
            decision = filtering_order.failed(self.settings, failure)
        except Exception as exc:  # noqa: BLE001 - never die of a request: answer the default
            decision = filtering_order.failed(self.settings, Unavailable("unexpected", repr(exc)))
            traceback = True
        if decision.failure is not None:
            self.on_failure(decision.failure.kind)
            self.failures.report(
                decision.failure.kind, decision.failure.reason, traceback=traceback
            )
        return decision

    async def _judge(
        self, request: PolicyRequest, explained: list[LookupAnswer] | None = None
    ) -> Decision:
        """Ask the order, fetch what it asks for, until it decides; then write its state.

        With `explained`, each lookup and its answer are appended there and nothing is
        written (an explanation)."""
        lists = self.lists.current
        instance = request.instance
        sent = self._sent_headers.get(instance) if instance else None
        if sent is not None:
            self._sent_headers.move_to_end(instance)
        gathered = Gathered(sent_headers=frozenset(sent) if sent else frozenset())
        facts = filtering_order.request_facts(request, lists, self.settings)
        for _ in range(MAX_STEPS):
            step = filtering_order.next_step(facts, self.settings, gathered, self.clock())
            if isinstance(step, Decision):
                if explained is not None:
                    return step
                write = step.greylist_write
                if write is not None and step.failure is None:
                    try:
                        await self.store.greylist_update(
                            write.triplet_key,
                            write.triplet,
                            write.client_network,
                            write.network,
                            write.ttl,
                        )
                    except StoreError as exc:
                        gathered.greylist_write = _unavailable(exc)
                        continue
                if step.remember_header is not None:
                    self._remember(instance, step.remember_header)
                return step
            answer = await self._fetch(step, gathered)
            if explained is not None:
                explained.append((step, answer))
        raise RuntimeError(f"the filtering order took more than {MAX_STEPS} steps")

    async def _fetch(self, lookup: Lookup, gathered: Gathered) -> object:
        """Add the answer to `lookup` to `gathered` (and return it); a store or DNS failure
        as Unavailable."""
        try:
            if isinstance(lookup, DnsblLookup):
                assert self.dnsbl is not None  # the order asks only for steps that are on
                gathered.dnsbl = await self.dnsbl.check(lookup.client_address)
                return gathered.dnsbl
            if isinstance(lookup, SpfLookup):
                assert self.spf is not None
                gathered.spf = await self.spf.check(
                    lookup.client_address, lookup.sender, lookup.helo
                )
                return gathered.spf
            triplet, network = await self.store.greylist_lookup(
                lookup.triplet_key, lookup.client_network
            )
            gathered.greylist = GreylistRecords(triplet, network)
            return gathered.greylist
        except (StoreError, dns.exception.DNSException) as exc:
            failure = _unavailable(exc)
            if isinstance(lookup, DnsblLookup):
                gathered.dnsbl = failure
            elif isinstance(lookup, SpfLookup):
                gathered.spf = failure
            else:
                gathered.greylist = failure
            return failure

    def _remember(self, instance: str, header: str) -> None:
        sent = self._sent_headers.get(instance)
        if sent is None:
            sent = set()
            self._sent_headers[instance] = sent
            if len(self._sent_headers) > INSTANCE_MEMORY:
                self._sent_headers.popitem(last=False)
        else:
            self._sent_headers.move_to_end(instance)
        sent.add(header)
