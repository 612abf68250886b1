"""DKIM verification of inbound mail (dkimpy) and its `Authentication-Results:` header (authres).

Every DKIM-Signature of a message is checked; keys are fetched with dnspython from the
configured `[dns]` nameservers within `dns.timeout`. The outcome of each signature maps to
RFC 8601 results: pass, fail (the signature or body hash does not match), permerror (no key,
malformed signature or key) and temperror (DNS timed out or failed). Also finds
`Authentication-Results:` fields that claim to come from us: the milter removes them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import authres
import dkim
import dns.exception
import dns.rdatatype
import dns.resolver

from postwarden.config.model import Config, DnsConfig
from postwarden.dns_resolver import make_sync_resolver
from postwarden.untrusted import sanitise

log = logging.getLogger("postwarden.milterd")
# dkimpy logs every failed lookup at ERROR; our one line per message says it already.
_dkimpy_log = logging.getLogger("postwarden.milterd.dkimpy")
_dkimpy_log.setLevel(logging.CRITICAL)

AR_HEADER = "Authentication-Results"
# A reason quotes tag values from the message: bounded, one line, for the log and the header.
REASON_LIMIT = 200
# Each signature may cost one DNS lookup of up to dns.timeout: a bound on how many are checked
# keeps a message with hundreds of signatures from holding a milter thread for minutes.
MAX_SIGNATURES = 10
DnsFunc = Callable[..., bytes | None]


class DnsTemporaryError(Exception):
    """The key lookup timed out or the server failed: the result is temperror."""


class KeyNotFoundError(Exception):
    """No TXT record at selector._domainkey.domain: the result is permerror."""


@dataclass(frozen=True)
class DkimResult:
    """The outcome of one DKIM-Signature."""

    result: str  # pass | fail | permerror | temperror | policy | none
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    identity: str = ""
    reason: str = ""


def make_dnsfunc(cfg: DnsConfig) -> DnsFunc:
    """dkimpy's `dnsfunc(name, timeout=...)` over a dnspython resolver built from `[dns]`."""
    resolver = make_sync_resolver(cfg)
    return resolver_dnsfunc(resolver)


def resolver_dnsfunc(resolver: dns.resolver.Resolver) -> DnsFunc:
    def lookup(name: bytes, timeout: float = 5.0) -> bytes | None:
        qname = name.decode("ascii", "replace")
        try:
            answer = resolver.resolve(qname, dns.rdatatype.TXT, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            raise KeyNotFoundError(f"no key published at {qname}") from None
        except dns.exception.Timeout:
            raise DnsTemporaryError(f"DNS timeout looking up {qname}") from None
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"DNS failure looking up {qname}: {exc}") from None
        records = [b"".join(rdata.strings) for rdata in answer]
        # Several TXT records: the DKIM one is the one dkimpy can read.
        for record in records:
            if record.lstrip().startswith(b"v=DKIM1") or b"p=" in record:
                return record
        return records[0] if records else None

    return lookup


def _tag(fields: dict[bytes, bytes], name: bytes) -> str:
    return fields.get(name, b"").decode("ascii", "replace")


def verify_message(message: bytes, dnsfunc: DnsFunc, *, timeout: float = 5.0) -> list[DkimResult]:
    """Check every DKIM-Signature of `message` (CRLF line ends); [] when there is none."""
    try:
        checker = dkim.DKIM(message, logger=_dkimpy_log, timeout=timeout)
    except dkim.DKIMException as exc:
        reason = sanitise(f"unparsable message: {exc}", REASON_LIMIT)
        return [DkimResult("permerror", reason=reason)]
    count = sum(1 for name, _ in checker.headers if name.lower() == b"dkim-signature")
    results = []
    for idx in range(min(count, MAX_SIGNATURES)):
        checker.signature_fields = {}
        try:
            ok = checker.verify(idx=idx, dnsfunc=dnsfunc)
            outcome, reason = ("pass", "") if ok else ("fail", "signature did not verify")
        except DnsTemporaryError as exc:
            outcome, reason = "temperror", str(exc)
        except KeyNotFoundError as exc:
            outcome, reason = "permerror", str(exc)
        except dkim.ValidationError as exc:
            # "body hash mismatch (got ..., expected ...)": the part before the hashes.
            outcome, reason = "fail", str(exc).split(" (", 1)[0]
        except dkim.DKIMException as exc:
            outcome, reason = "permerror", str(exc)
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            # dkimpy on hostile input can fail below its own exception types.
            outcome, reason = "permerror", f"malformed signature ({type(exc).__name__})"
        fields = checker.signature_fields
        results.append(
            DkimResult(
                outcome,
                domain=_tag(fields, b"d"),
                selector=_tag(fields, b"s"),
                algorithm=_tag(fields, b"a"),
                identity=_tag(fields, b"i"),
                reason=sanitise(reason, REASON_LIMIT),
            )
        )
    if count > MAX_SIGNATURES:
        skipped = count - MAX_SIGNATURES
        reason = f"{skipped} more signatures not checked (limit {MAX_SIGNATURES})"
        results.append(DkimResult("policy", reason=reason))
    return results


def authserv_id(config: Config) -> str:
    return (config.milterd.authserv_id or config.mail.hostname).lower()


_SAFE_VALUE = re.compile(r"^[A-Za-z0-9.@_+=-]+$")


def _clean(value: str) -> str | None:
    # authres writes values verbatim: keep only what is a plain token.
    return value if value and _SAFE_VALUE.match(value) else None


def results_header(server_id: str, results: Sequence[DkimResult]) -> str:
    """The `Authentication-Results:` value (without the field name)."""
    clauses: list[authres.DKIMAuthenticationResult] = []
    for item in results or [DkimResult("none")]:
        clauses.append(
            authres.DKIMAuthenticationResult(
                result=item.result,
                # Inside a quoted-string: no quote or backslash may end it early.
                reason=item.reason.replace('"', "'").replace("\\", "/") or None,
                header_d=_clean(item.domain),
                header_i=_clean(item.identity),
                header_a=_clean(item.algorithm),
                header_s=_clean(item.selector),
            )
        )
    header = authres.AuthenticationResultsHeader(authserv_id=server_id, results=clauses)
    return str(header.header_value())


_AUTHSERV = re.compile(rb"^\s*(?:\([^)]*\)\s*)*([^\s;()]+)")


def header_authserv_id(value: bytes) -> str | None:
    """The authserv-id an Authentication-Results value starts with (comments skipped)."""
    m = _AUTHSERV.match(value)
    return m.group(1).decode("ascii", "replace").lower() if m else None


def forged_results(headers: Sequence[tuple[bytes, bytes]], server_id: str) -> list[int]:
    """1-based indexes, among the Authentication-Results fields, of those claiming our id."""
    forged = []
    index = 0
    for name, value in headers:
        if name.lower() == AR_HEADER.lower().encode():
            index += 1
            if header_authserv_id(value) == server_id.lower():
                forged.append(index)
    return forged


def log_results(results: Sequence[DkimResult], queue_id: str) -> None:
    """One line per signature that could not be checked: temperror is ours, permerror theirs."""
    for item in results:
        if item.result in ("temperror", "permerror"):
            log.log(
                logging.WARNING if item.result == "temperror" else logging.INFO,
                "%s: dkim=%s d=%s s=%s: %s",
                queue_id,
                item.result,
                item.domain,
                item.selector,
                item.reason,
            )
