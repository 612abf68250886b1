"""The inbound filtering order of DESIGN.md for one policy request (no sockets here).

`Pipeline.evaluate()` does the I/O (store, DNS) around the pure decision functions:

1. only RCPT-stage requests are judged (others: DUNNO, not_applicable);
2. outgoing mail (SASL or a trusted network): DUNNO, trusted;
3. the permitted/forbidden lists, steps A-D (`precedence.decide_lists`);
4. DNSBL, then SPF (a fail may reject; otherwise its Received-SPF header is kept),
   then greylisting (store lookup, pure `greylisting.decide`, store update).

Postfix takes ONE action per reply, so when SPF and greylisting both want a PREPEND the
Received-SPF header wins (it carries the authentication result other tools read;
X-Greylist is informational). Every recipient of one message gets its own request with
the same `instance`, so headers already prepended for that instance are remembered (a
bounded LRU) and not repeated; a later recipient then prepends the next header that was
not sent yet, so a multi-recipient message can carry both.

Any store or DNS failure, unexpected exception or the request timeout gives the
configured `policyd.default_action` with rule `default`: mail is never refused by our
fault. Each failure kind is logged at most once per `FAILURE_LOG_INTERVAL`, with a
traceback only for unexpected exceptions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import dns.exception

from postwarden.config.model import Config
from postwarden.policy import dnsbl, greylisting, precedence, spf_check
from postwarden.policy.live_lists import LiveLists
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Action, Rule, Verdict, dunno
from postwarden.store.base import Store, StoreError

log = logging.getLogger("postwarden.policy.pipeline")

FAILURE_LOG_INTERVAL = 60.0  # seconds between log lines for one kind of failure
INSTANCE_MEMORY = 10_000  # messages whose prepended headers are remembered

_NOT_APPLICABLE = dunno(Rule.NOT_APPLICABLE)
_TRUSTED = dunno(Rule.TRUSTED)


DnsblVerdict = Callable[[dnsbl.DnsblResult], Verdict | None]
SpfVerdict = Callable[[spf_check.SpfResult], Verdict | None]


class FailureLog:
    """Logs each kind of failure at most once per interval, counting what it held back."""

    def __init__(self, interval: float = FAILURE_LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def report(self, kind: str, message: str, *, traceback: bool = False) -> None:
        now = time.monotonic()
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
        dnsbl_verdict: DnsblVerdict | None = None,
        spf_verdict: SpfVerdict | None = None,
    ) -> None:
        self.store = store
        self.lists = lists
        self.clock = clock
        self.failures = FailureLog()
        self._sent_headers: OrderedDict[str, set[str]] = OrderedDict()
        self.configure(cfg, dnsbl_checker, spf_checker, large_senders, dnsbl_verdict, spf_verdict)
        # Called with the kind of each failure (metrics hook; set by the server).
        self.on_failure: Callable[[str], None] = lambda kind: None

    def configure(
        self,
        cfg: Config,
        dnsbl_checker: dnsbl.DnsblChecker | None,
        spf_checker: spf_check.SpfChecker | None,
        large_senders: greylisting.LargeSenders | None,
        dnsbl_verdict: DnsblVerdict | None = None,
        spf_verdict: SpfVerdict | None = None,
    ) -> None:
        """Swap in a (reloaded) config and the checkers built from it."""
        self.cfg = cfg
        self.dnsbl = dnsbl_checker if cfg.dnsbl.enabled else None
        self.spf = spf_checker if cfg.spf.enabled else None
        self.large_senders = large_senders
        self._dnsbl_verdict: DnsblVerdict = dnsbl_verdict or functools.partial(
            dnsbl.verdict_for, cfg=cfg.dnsbl
        )
        self._spf_verdict: SpfVerdict = spf_verdict or functools.partial(
            spf_check.verdict_for, cfg=cfg.spf
        )
        self.default = Verdict(Action(cfg.policyd.default_action), Rule.DEFAULT)
        self._timeout = cfg.policyd.request_timeout
        # Only DNS and a networked store can make a request wait; the SQLite store answers
        # synchronously, so without DNS checks the timeout (~12 µs a request) bounds nothing.
        self._bounded = not (
            self.dnsbl is None and self.spf is None and getattr(self.store, "synchronous", False)
        )
        self._trusted = tuple(cfg.network.trusted)
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
        if request.protocol_state != "RCPT":
            return _NOT_APPLICABLE
        try:
            if not self._bounded:
                return await self._judge(request)
            async with asyncio.timeout(self._timeout):
                return await self._judge(request)
        except TimeoutError:
            self._fail("timeout", f"no verdict within {self._timeout:g}s")
        except StoreError as exc:
            self._fail("store", str(exc) or type(exc).__name__)
        except dns.exception.DNSException as exc:
            self._fail("dns", str(exc) or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - never die of a request: answer the default
            self._fail("unexpected", repr(exc), traceback=True)
        return self.default

    def _fail(self, kind: str, message: str, *, traceback: bool = False) -> None:
        self.on_failure(kind)
        self.failures.report(kind, message, traceback=traceback)

    async def _judge(self, request: PolicyRequest) -> Verdict:
        if precedence.is_outgoing(request, self._trusted):
            return _TRUSTED
        verdict = precedence.decide_lists(request, self.lists.current)
        if verdict.final:
            return verdict
        rule = Rule.NO_CHECKS
        headers: list[Verdict] = []
        if self.dnsbl is not None:
            found = self._dnsbl_verdict(await self.dnsbl.check(request.client_address))
            if found is not None:
                if found.action is not Action.PREPEND and found.action is not Action.DUNNO:
                    return found
                rule = found.rule
        if self.spf is not None:
            spf_result = await self.spf.check(
                request.client_address, request.sender, request.helo_name
            )
            found = self._spf_verdict(spf_result)
            if found is not None:
                if found.action is Action.PREPEND:
                    headers.append(found)
                elif found.action is not Action.DUNNO:
                    return found
                rule = found.rule
        if self.cfg.greylisting.enabled:
            found = await self._greylist(request)
            if found.action is Action.PREPEND:
                headers.append(found)
            elif found.action is not Action.DUNNO:
                return found
            rule = found.rule
        if not headers:
            return dunno(rule)
        return self._first_unsent_header(request.instance, headers, rule)

    async def _greylist(self, request: PolicyRequest) -> Verdict:
        gcfg = self.cfg.greylisting
        try:
            network = greylisting.client_network(
                request.client_address, gcfg.ipv4_prefix, gcfg.ipv6_prefix
            )
        except greylisting.InvalidClientAddress:
            return dunno(Rule.NO_CHECKS)  # no address to group by: nothing to greylist
        key = greylisting.triplet_key(
            network, greylisting.normalise_sender(request.sender), request.recipient.lower()
        )
        exempt = self.large_senders is not None and self.large_senders.matches(
            request.client_name, request.client_address
        )
        triplet, known_network = await self.store.greylist_lookup(key, network)
        decision = greylisting.decide(triplet, known_network, self.clock(), gcfg, exempt=exempt)
        if decision.triplet_record is not None or decision.network_record is not None:
            await self.store.greylist_update(
                key, decision.triplet_record, network, decision.network_record, gcfg.expiry
            )
        return decision.verdict

    def _first_unsent_header(self, instance: str, headers: list[Verdict], rule: Rule) -> Verdict:
        if not instance:
            return Verdict(Action.PREPEND, rule, text=headers[0].text)
        sent = self._sent_headers.get(instance)
        if sent is None:
            sent = set()
            self._sent_headers[instance] = sent
            if len(self._sent_headers) > INSTANCE_MEMORY:
                self._sent_headers.popitem(last=False)
        else:
            self._sent_headers.move_to_end(instance)
        for header in headers:
            name = header.text.partition(":")[0].strip().lower()
            if name not in sent:
                sent.add(name)
                return Verdict(Action.PREPEND, rule, text=header.text)
        return dunno(rule)
