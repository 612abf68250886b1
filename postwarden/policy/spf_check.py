"""SPF (RFC 7208) with pyspf: evaluated in worker threads, bounded in time, through our resolver.

pyspf is synchronous, so each evaluation runs in a bounded ThreadPoolExecutor and the event
loop waits at most `spf.timeout` for it (then the result is temperror). pyspf's own global
lookup-time limit (`querytime`) is set to the same bound, so an abandoned thread also ends.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.resolver
import spf

from postwarden.config.model import DnsConfig, SpfConfig
from postwarden.dns.resolver import make_sync_resolver
from postwarden.policy.verdict import Rule, Verdict, prepend, reject
from postwarden.syntax.ip_addresses import parse_client_ip

log = logging.getLogger("postwarden.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
WORKERS = 16  # concurrent SPF evaluations; more requests queue (and may hit the timeout)
MAX_TEXT = 200  # characters of an untrusted explanation we repeat to the client

_thread_state = threading.local()
_pyspf_lookup = spf.DNSLookup


def _lookup(name: str, qtype: str, strict: object = True, timeout: float = 30) -> list[Any]:
    """pyspf's DNSLookup contract, answered by the resolver of the calling SPF worker."""
    resolver: dns.resolver.Resolver | None = getattr(_thread_state, "resolver", None)
    if resolver is None:
        return list(_pyspf_lookup(name, qtype, strict, timeout))
    found: list[Any] = []
    try:
        answers = resolver.resolve(name, qtype, lifetime=min(timeout, resolver.lifetime))
    except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
        return found
    except dns.exception.DNSException as exc:
        # Timeouts, SERVFAIL from every server, ...: pyspf turns this into temperror.
        raise spf.TempError(f"DNS {type(exc).__name__}: {exc}") from exc
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
    """A key-value value: dot-atom as is, anything else as a quoted-string (RFC 5322)."""
    text = _clean(text, 255)
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


def received_spf_header(
    result: str,
    *,
    client_ip: str,
    envelope_from: str,
    helo: str,
    receiver: str | None = None,
    problem: str = "",
    mechanism: str = "",
) -> str:
    """`Received-SPF: result (comment) key=value; ...` (RFC 7208 section 9.1), one line."""
    domain = envelope_from.rpartition("@")[2]
    comment = header_comment(result, domain, client_ip, problem)
    if receiver:
        comment = f"{receiver}: {comment}"
    pairs = [
        ("client-ip", client_ip),
        ("envelope-from", envelope_from),
        ("helo", helo),
        ("receiver", receiver or ""),
        ("mechanism", mechanism),
        ("problem", problem if result in ("permerror", "temperror") else ""),
        ("identity", "mailfrom"),
    ]
    values = "; ".join(f"{key}={_value(val)}" for key, val in pairs if val)
    return f"Received-SPF: {result} ({_comment_text(comment)}) {values}"


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


def _evaluate(
    resolver: dns.resolver.Resolver,
    ip: str,
    identity: str,
    helo: str,
    receiver: str | None,
    timeout: float,
) -> SpfResult:
    """Runs in a worker thread: one pyspf evaluation through `resolver`."""
    _thread_state.resolver = resolver
    try:
        query = spf.query(
            i=ip, s=identity, h=helo, receiver=receiver, timeout=timeout, querytime=timeout
        )
        result, _code, explanation = query.check()
    finally:
        _thread_state.resolver = None
    mechanism = str(getattr(query, "mechanism", None) or "")
    problem = explanation if result in ("permerror", "temperror") else ""
    if result == "permerror":
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


class SpfChecker:
    """Evaluates SPF off the event loop, through the `[dns]` resolver, within `cfg.timeout`."""

    def __init__(
        self,
        cfg: SpfConfig,
        dns_cfg: DnsConfig,
        receiver: str | None = None,
        workers: int = WORKERS,
        *,
        timer: Callable[[float], asyncio.Timeout] = asyncio.timeout,
    ) -> None:
        self.cfg = cfg
        # The time budget as an async context manager (tests expire it by hand).
        self._timer = timer
        # The host name put in `receiver=` (mail.hostname); None leaves it out.
        self.receiver = receiver
        self.resolver = make_sync_resolver(dns_cfg)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="spf"
        )

    def _temperror(self, ip: str, identity: str, helo: str, problem: str) -> SpfResult:
        return SpfResult(
            "temperror",
            problem,
            received_spf_header(
                "temperror",
                client_ip=ip,
                envelope_from=identity,
                helo=helo,
                receiver=self.receiver,
                problem=problem,
            ),
        )

    async def check(self, ip: str, sender: str, helo: str) -> SpfResult:
        """SPF result for MAIL FROM `sender` (or postmaster@helo) from client `ip`."""
        identity = mail_from_identity(sender, helo)
        # IPv4-mapped becomes IPv4: SPF's ip4: mechanisms must match it.
        address = parse_client_ip(ip)
        if address is None:
            log.info("spf: cannot evaluate %r from %r: not an IP address", identity, ip)
            return self._temperror(ip, identity, helo, "invalid client address")
        ip = str(address)
        if "@" not in identity or not identity.rpartition("@")[2]:
            explanation = "no domain to check (null sender and no HELO)"
            header = received_spf_header(
                "none", client_ip=ip, envelope_from=identity, helo=helo, receiver=self.receiver
            )
            return SpfResult("none", explanation, header)
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(
            self._executor,
            _evaluate,
            self.resolver,
            ip,
            identity,
            helo,
            self.receiver,
            self.cfg.timeout,
        )
        try:
            async with self._timer(self.cfg.timeout):
                return await job
        except TimeoutError:
            log.warning(
                "spf: no result for %r from %s within %.1fs: temperror",
                identity,
                ip,
                self.cfg.timeout,
            )
            return self._temperror(ip, identity, helo, f"no result within {self.cfg.timeout}s")

    def close(self) -> None:
        """Take no new checks; threads end once the checks already handed in are done.

        Queued checks are not cancelled: on a SIGHUP reload they belong to requests still
        waiting for an answer, and a cancelled one would drop its Postfix connection. Each
        is bounded by its own timeout.
        """
        self._executor.shutdown(wait=False, cancel_futures=False)


def verdict_for(result: SpfResult, cfg: SpfConfig) -> Verdict | None:
    """fail + reject: 550 5.7.23; otherwise Received-SPF via PREPEND when enabled."""
    if result.result == "fail" and cfg.fail_action == "reject":
        text = f"SPF check failed: {_clean(result.explanation)}"
        return reject(Rule.SPF_FAIL, text, 550, "5.7.23")
    if cfg.add_header:
        return prepend(Rule.SPF, result.received_spf)
    return None
