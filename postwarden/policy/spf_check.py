"""SPF (RFC 7208) with pyspf: evaluated in worker threads, bounded in time, through our resolver.

Time. One check has `spf.timeout` seconds (default 20: RFC 7208 section 4.6.4 says a limit
"SHOULD allow at least 20 seconds"), counted from the moment the request asks for it. The
budget is kept inside the evaluation, by the lookups themselves: every DNS query may take
at most the time left (and at most `dns.timeout`), and no query starts once it is used up
(temperror). So the last lookup ends with its own answer or error by the end of the budget,
and pyspf decides what that means: a timed-out `exp=` lookup is ignored and `fail` stays
`fail` (RFC 7208 test suite, exp-dns-error), whichever of `spf.timeout` and `dns.timeout` is
longer. The event loop's own limit comes GRACE seconds later and is only a backstop for a
thread that does not keep the budget, so it never races the last lookup.

Concurrency. pyspf is synchronous: an evaluation holds a thread as long as its DNS takes.
Threads are made as needed, up to MAX_THREADS (more than the concurrent SMTP sessions
Postfix runs by default), and at most PER_DOMAIN evaluations for one sender domain run at
once; the others wait in the event loop, within their own budget. Identical checks in flight
(same client, sender and HELO: the recipients of one message) share one evaluation. So the
senders of a domain whose DNS never answers hold PER_DOMAIN threads, not all of them, and an
unrelated sender is evaluated at once.

What remote parties see. A failed lookup is `temperror` with the problem "DNS lookup failed"
(or "DNS lookup timed out"): the header never carries the resolver's address or the DNS
library's error text; those go to postwarden's own log line.

How pyspf is pointed at `[dns] nameservers`: every DNS lookup pyspf makes goes through one
module-level function, `spf.DNSLookup(name, qtype, strict, timeout)` (pyspf itself assigns
it at import, choosing between its pydns and dnspython back ends). We replace that one name
with a dispatcher that uses the resolver the calling worker thread set in a thread-local,
and falls back to pyspf's original for any other caller. Nothing else of pyspf or
dnspython is patched, and the process-wide default resolver is left alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.name
import dns.resolver
import spf

from postwarden.config.model import DnsConfig, SpfConfig
from postwarden.dns.resolver import make_sync_resolver
from postwarden.policy.verdict import Rule, Verdict, prepend, reject
from postwarden.syntax.ip_addresses import parse_client_ip

log = logging.getLogger("postwarden.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# Evaluations running at once (threads, made as needed). Postfix runs at most
# `mail.max_connections` (default 100) smtpd processes, each waiting for one policy answer.
MAX_THREADS = 128
# Of those, evaluations for one sender domain: a domain whose DNS never answers holds these.
PER_DOMAIN = 4
# The event loop waits this much longer than spf.timeout before it gives up on a thread.
GRACE = 1.0
MAX_TEXT = 200  # characters of an untrusted explanation we repeat to the client
# policyd answers the header on one PREPEND line and cuts it at this length (its codec's
# MAX_HEADER_LENGTH; a test holds the two equal).
HEADER_LIMIT = 990
# The only problems a temperror shows: nothing of our resolver or the DNS library.
DNS_FAILED = "DNS lookup failed"
DNS_TIMED_OUT = "DNS lookup timed out"
# pyspf's own words when its `querytime` is used up, and ours.
_OUT_OF_TIME = frozenset({DNS_TIMED_OUT, "DNS Error: exceeded max query lookup time"})

_thread_state = threading.local()
_pyspf_lookup = spf.DNSLookup


def _lookup(name: str, qtype: str, strict: object = True, timeout: float = 30) -> list[Any]:
    """pyspf's DNSLookup contract, answered by the resolver of the calling SPF worker."""
    resolver: dns.resolver.Resolver | None = getattr(_thread_state, "resolver", None)
    if resolver is None:
        return list(_pyspf_lookup(name, qtype, strict, timeout))
    left = _thread_state.deadline - time.monotonic()
    if left <= 0:
        raise spf.TempError(DNS_TIMED_OUT)
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException:
        # Bad IDNA, an empty or over-long label: no such name can exist, as for NXDOMAIN
        # (RFC 7208 section 4.3), not a failure of DNS.
        return []
    found: list[Any] = []
    try:
        answers = resolver.resolve(name, qtype, lifetime=min(timeout, resolver.lifetime, left))
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return found
    except (dns.exception.DNSException, OSError, ValueError) as exc:
        # Timeouts, SERVFAIL from every server, ...: pyspf turns this into temperror. The
        # detail (it names our nameservers) is for our log only.
        log.info("spf: DNS lookup %s %r failed: %s: %s", qtype, name, type(exc).__name__, exc)
        raise spf.TempError(DNS_FAILED) from exc
    # The same shapes as pyspf's DNSLookup_dnspython returns.
    for rdata in answers:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), rdata.strings))
    return found


spf.DNSLookup = _lookup


# -- the Received-SPF header (pure) --------------------------------------------------------

_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_COMMENT_SPECIALS = re.compile(r"[()\\]")


def _clean(text: str, limit: int = MAX_TEXT) -> str:
    """Untrusted text made safe inside one header line: no CR/LF or other control chars."""
    return _CONTROL.sub("", text)[:limit]


def _value(text: str) -> str:
    """A key-value value: dot-atom as is, anything else as a quoted-string (RFC 5322).

    Not cut here: received_spf_header() fits the whole header, leaving a key out rather
    than cutting its value.
    """
    text = _clean(text, HEADER_LIMIT)
    if _DOT_ATOM.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_text(text: str) -> str:
    # A comment may not hold unbalanced parentheses; backslashes would quote.
    return _COMMENT_SPECIALS.sub("", _clean(text))


def header_comment(result: str, domain: str, ip: str, problem: str = "") -> str:
    """The human part of Received-SPF, in RFC 7208 section 9.1's wording."""
    d = domain or "(unknown)"
    comments = {
        "pass": f"domain of {d} designates {ip} as permitted sender",
        "fail": f"domain of {d} does not designate {ip} as permitted sender",
        "softfail": f"transitioning domain of {d} does not designate {ip} as permitted sender",
        "neutral": f"{ip} is neither permitted nor denied by domain of {d}",
        "none": f"domain of {d} does not designate permitted sender hosts",
        "permerror": f"permanent error in processing domain of {d}: {problem}",
        "temperror": f"temporary error in processing during lookup of {d}: {problem}",
    }
    return comments[result]


# Fitting a header into HEADER_LIMIT: the comment is shortened first (it is for people and
# repeats the keys), then these keys are left out whole, in this order; a value is cut only
# when the keys that remain cannot fit otherwise, which no valid input reaches (the longest
# mailbox, HELO and receiver names with an IPv6 client take 890 characters).
_LEFT_OUT_FIRST = ("mechanism", "problem", "receiver")
_SHORTEST_COMMENT = 24
_FIT_ROUNDS = 8


def _shortened(text: str, room: int) -> str:
    """`text` in at most `room` characters, marked "..." where it was cut."""
    return text if len(text) <= room else text[: max(0, room - 3)].rstrip() + "..."


def _fitted_pairs(pairs: list[tuple[str, str]], room: int) -> list[tuple[str, str]]:
    """The key-value pairs (raw values) whose rendering fits `room` characters."""

    def width(kept: list[tuple[str, str]]) -> int:
        return len("; ".join(f"{key}={_value(val)}" for key, val in kept))

    kept = list(pairs)
    for key in _LEFT_OUT_FIRST:
        if width(kept) <= room:
            return kept
        kept = [(k, v) for k, v in kept if k != key]
    # Only hostile input gets here (values of escaped quotes): cut the longest value.
    for _ in range(_FIT_ROUNDS):
        over = width(kept) - room
        if over <= 0:
            break
        index = max(range(len(kept)), key=lambda i: len(_value(kept[i][1])))
        key, val = kept[index]
        cleaned = _clean(val, HEADER_LIMIT)
        kept[index] = (key, _shortened(cleaned, max(3, len(cleaned) - over)))
    return kept


def received_spf_header(
    result: str,
    *,
    client_ip: str,
    envelope_from: str,
    helo: str,
    receiver: str | None = None,
    problem: str = "",
    mechanism: str = "",
    limit: int = HEADER_LIMIT,
) -> str:
    """`Received-SPF: result (comment) key=value; ...` (RFC 7208 section 9.1), one line.

    At most `limit` characters, every key-value pair whole: the comment gives way first.
    """
    domain = envelope_from.rpartition("@")[2]
    comment = header_comment(result, domain, client_ip, problem)
    if receiver:
        comment = f"{receiver}: {comment}"
    comment = _comment_text(comment)
    pairs = [
        (key, val)
        for key, val in (
            ("client-ip", client_ip),
            ("envelope-from", envelope_from),
            ("helo", helo),
            ("receiver", receiver or ""),
            ("mechanism", mechanism),
            ("problem", problem if result in ("permerror", "temperror") else ""),
            ("identity", "mailfrom"),
        )
        if val
    ]
    start = f"Received-SPF: {result} "
    pairs = _fitted_pairs(pairs, limit - len(start))
    values = "; ".join(f"{key}={_value(val)}" for key, val in pairs)
    room = limit - len(start) - len(values) - len("() ")
    if room >= min(len(comment), _SHORTEST_COMMENT):
        return f"{start}({_shortened(comment, room)}) {values}"
    return f"{start}{values}"


# -- the check -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One SPF evaluation: the result name, pyspf's explanation, the header to prepend."""

    result: str
    explanation: str
    received_spf: str


def mail_from_identity(sender: str, helo: str) -> str:
    """The MAIL FROM identity: for a null sender, postmaster@HELO (RFC 7208 section 2.4)."""
    return sender if sender else (f"postmaster@{helo}" if helo else "")


def is_malformed_domain(domain: str) -> bool:
    """True for a <domain> check_host() answers "none" at once (RFC 7208 section 4.3).

    Malformed as the resolver would see it (its own IDNA conversion and label rules), or not
    a multi-label name.
    """
    try:
        name = dns.name.from_text(domain)
    except dns.exception.DNSException:  # bad IDNA, empty label, label or name too long
        return True
    return len(name.labels) < 3  # "localhost." is ("localhost", "")


def _temperror(ip: str, identity: str, helo: str, receiver: str | None, problem: str) -> SpfResult:
    return SpfResult(
        "temperror",
        problem,
        received_spf_header(
            "temperror",
            client_ip=ip,
            envelope_from=identity,
            helo=helo,
            receiver=receiver,
            problem=problem,
        ),
    )


def _evaluate(
    resolver: dns.resolver.Resolver,
    ip: str,
    identity: str,
    helo: str,
    receiver: str | None,
    deadline: float,
) -> SpfResult:
    """Runs in a worker thread: one pyspf evaluation through `resolver`, done by `deadline`.

    `deadline` is on time.monotonic()'s clock: a check that waited for a thread until it
    passed makes no query.
    """
    left = deadline - time.monotonic()
    if left <= 0:
        return _temperror(ip, identity, helo, receiver, DNS_TIMED_OUT)
    _thread_state.resolver = resolver
    _thread_state.deadline = deadline
    try:
        query = spf.query(i=ip, s=identity, h=helo, receiver=receiver, timeout=left, querytime=left)
        result, _code, explanation = query.check()
    finally:
        _thread_state.resolver = None
    mechanism = str(getattr(query, "mechanism", None) or "")
    problem = ""
    if result == "temperror":
        # Ours (DNS_FAILED, DNS_TIMED_OUT) or pyspf's own ("exceeded max query lookup
        # time"): the header says only that DNS failed.
        timed_out = getattr(query, "prob", None) in _OUT_OF_TIME
        problem = DNS_TIMED_OUT if timed_out else DNS_FAILED
        explanation = f"SPF Temporary Error: {problem}"
    elif result == "permerror":
        problem = getattr(query, "prob", None) or explanation
    return SpfResult(
        result=result,
        explanation=str(explanation),
        received_spf=received_spf_header(
            result,
            client_ip=ip,
            envelope_from=identity,
            helo=helo,
            receiver=receiver,
            problem=str(problem),
            mechanism=mechanism if result in ("pass", "fail", "softfail", "neutral") else "",
        ),
    )


# (client IP, MAIL FROM identity, HELO): what one evaluation depends on.
CheckKey = tuple[str, str, str]


class _DomainSlots:
    """Evaluations of one sender domain: PER_DOMAIN may run, `users` counts those asking."""

    __slots__ = ("running", "users")

    def __init__(self, limit: int) -> None:
        self.running = asyncio.Semaphore(limit)
        self.users = 0


class SpfChecker:
    """Evaluates SPF off the event loop, through the `[dns]` resolver, within `cfg.timeout`."""

    def __init__(
        self,
        cfg: SpfConfig,
        dns_cfg: DnsConfig,
        receiver: str | None = None,
        workers: int = MAX_THREADS,
        *,
        per_domain: int = PER_DOMAIN,
        timer: Callable[[float], asyncio.Timeout] = asyncio.timeout,
    ) -> None:
        self.cfg = cfg
        # The event loop's backstop as an async context manager (tests expire it by hand).
        self._timer = timer
        # The host name put in `receiver=` (mail.hostname); None leaves it out.
        self.receiver = receiver
        self.resolver = make_sync_resolver(dns_cfg)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="spf"
        )
        self._per_domain = per_domain
        self._domains: dict[str, _DomainSlots] = {}
        self._in_flight: dict[CheckKey, asyncio.Future[SpfResult]] = {}
        self._closing = False

    async def check(self, ip: str, sender: str, helo: str) -> SpfResult:
        """SPF result for MAIL FROM `sender` (or postmaster@helo) from client `ip`."""
        identity = mail_from_identity(sender, helo)
        # IPv4-mapped becomes IPv4: SPF's ip4: mechanisms must match it.
        address = parse_client_ip(ip)
        if address is None:
            log.info("spf: cannot evaluate %r from %r: not an IP address", identity, ip)
            return _temperror(ip, identity, helo, self.receiver, "invalid client address")
        ip = str(address)
        domain = identity.rpartition("@")[2]
        if "@" not in identity or not domain or is_malformed_domain(domain):
            explanation = f"malformed domain {_clean(domain)!r}" if domain else "no domain to check"
            header = received_spf_header(
                "none", client_ip=ip, envelope_from=identity, helo=helo, receiver=self.receiver
            )
            return SpfResult("none", explanation, header)
        key = (ip, identity, helo)
        evaluation = self._in_flight.get(key)
        if evaluation is None:
            deadline = time.monotonic() + self.cfg.timeout
            evaluation = asyncio.ensure_future(self._evaluate_in_turn(key, domain, deadline))
            self._in_flight[key] = evaluation
            evaluation.add_done_callback(lambda done: self._finished(key, done))
        try:
            async with self._timer(self.cfg.timeout + GRACE):
                # Shielded: one request given up (its own time limit) leaves the evaluation
                # to the others sharing it.
                return await asyncio.shield(evaluation)
        except TimeoutError:
            log.warning(
                "spf: no result for %r from %s within %.1fs: temperror",
                identity,
                ip,
                self.cfg.timeout + GRACE,
            )
            return _temperror(ip, identity, helo, self.receiver, DNS_TIMED_OUT)

    async def _evaluate_in_turn(self, key: CheckKey, domain: str, deadline: float) -> SpfResult:
        """One evaluation, once fewer than PER_DOMAIN of its domain are running."""
        ip, identity, helo = key
        domain = domain.lower().rstrip(".")
        slots = self._domains.get(domain)
        if slots is None:
            slots = self._domains[domain] = _DomainSlots(self._per_domain)
        slots.users += 1
        try:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await slots.running.acquire()
            except TimeoutError:
                log.info("spf: no turn for %r from %s before the budget ran out", identity, ip)
                return _temperror(ip, identity, helo, self.receiver, DNS_TIMED_OUT)
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    self._executor,
                    _evaluate,
                    self.resolver,
                    ip,
                    identity,
                    helo,
                    self.receiver,
                    deadline,
                )
            finally:
                slots.running.release()
        finally:
            slots.users -= 1
            if slots.users == 0:
                del self._domains[domain]

    def _finished(self, key: CheckKey, evaluation: asyncio.Future[SpfResult]) -> None:
        if self._in_flight.get(key) is evaluation:
            del self._in_flight[key]
        if not evaluation.cancelled():
            evaluation.exception()  # retrieved: every asker may have given up already
        if self._closing and not self._in_flight:
            self._executor.shutdown(wait=False, cancel_futures=False)

    def close(self) -> None:
        """Take no new checks; threads end once the checks already handed in are done.

        Checks in flight are not cancelled: on a SIGHUP reload they belong to requests still
        waiting for an answer, and a cancelled one would drop its Postfix connection. Each
        is bounded by its own timeout.
        """
        self._closing = True
        if not self._in_flight:
            self._executor.shutdown(wait=False, cancel_futures=False)


def verdict_for(result: SpfResult, cfg: SpfConfig) -> Verdict | None:
    """fail + reject: 550 5.7.23; otherwise Received-SPF via PREPEND when enabled."""
    if result.result == "fail" and cfg.fail_action == "reject":
        text = f"SPF check failed: {_clean(result.explanation)}"
        return reject(Rule.SPF_FAIL, text, 550, "5.7.23")
    if cfg.add_header:
        return prepend(Rule.SPF, result.received_spf)
    return None
