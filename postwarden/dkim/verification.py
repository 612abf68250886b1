"""DKIM verification of inbound mail (dkimpy) and its `Authentication-Results:` header.

Every DKIM-Signature of a message is checked; keys are fetched with dnspython from the
configured `[dns]` nameservers within `dns.timeout`. The outcome of each signature maps to
RFC 8601 results: pass, fail (the signature or body hash does not match), permerror (no key,
malformed signature or key) and temperror (DNS timed out or failed). The header is written
here, every sender-controlled value quoted or left out (authres parses it back in the tests).
Also finds `Authentication-Results:` fields that claim to come from us: the milter removes them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dkim
import dns.exception
import dns.rdatatype
import dns.resolver

from postwarden.config.model import Config, DnsConfig
from postwarden.dns.resolver import make_sync_resolver
from postwarden.syntax.domain_names import DomainNameError, check_labels
from postwarden.syntax.untrusted_text import sanitise

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


# What may stand unquoted in a property. Everything here is sender-controlled (the tags of a
# DKIM-Signature): a value that is not exactly this shape is left out, never passed through.
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_ALGORITHM = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def _record_name(value: str) -> bool:
    """Dot-separated DNS labels, `_` allowed (the one label rule, postwarden.syntax)."""
    try:
        check_labels(value.lower(), underscore=True)
    except DomainNameError:
        return False
    return True


def _identity(value: str) -> bool:
    # [dot-atom local-part] "@" domain: atext holds no blank, ";", "(", quote or backslash.
    local, at, domain = value.rpartition("@")
    return (
        bool(at) and (not local or _DOT_ATOM.fullmatch(local) is not None) and _record_name(domain)
    )


_PROPERTY_SHAPES: dict[str, Callable[[str], bool]] = {
    "header.d": _record_name,
    "header.s": _record_name,  # a selector is dot-separated labels too (RFC 6376 3.1)
    "header.i": _identity,
    "header.a": lambda value: _ALGORITHM.fullmatch(value) is not None,
}
# A header longer than this is folded between its results (Postfix would cut it at 998).
_FOLD_AT = 900


def _property(name: str, value: str) -> str | None:
    return f"{name}={value}" if value and _PROPERTY_SHAPES[name](value) else None


def quoted_string(text: str) -> str:
    """A quoted-string of printable ASCII that nothing can end early: no quote or backslash
    (they become ' and /, which naive parsers of quoted-pairs cannot get wrong either)."""
    text = sanitise(text, REASON_LIMIT).replace('"', "'").replace("\\", "/")
    return f'"{text}"'


def results_header(server_id: str, results: Sequence[DkimResult]) -> str:
    """The `Authentication-Results:` value (without the field name), RFC 8601.

    Built here rather than by authres, whose writer leaves any value containing "@"
    unquoted: a DNS error text as reason (unparsable header) or a sender-chosen selector
    `x@y dkim=pass header.d=paypal.com` (a second, forged result in our own header).
    The reason is always a quoted-string; properties only ever hold a well-formed domain,
    selector, identity or algorithm, and are left out otherwise.
    """
    clauses = []
    for item in results or [DkimResult("none")]:
        parts = [f"dkim={item.result}"]
        if item.reason:
            parts.append(f"reason={quoted_string(item.reason)}")
        for name, value in (
            ("header.d", item.domain),
            ("header.i", item.identity),
            ("header.a", item.algorithm),
            ("header.s", item.selector),
        ):
            prop = _property(name, value)
            if prop is not None:
                parts.append(prop)
        clauses.append(" ".join(parts))
    value = "; ".join([server_id, *clauses])
    if len(AR_HEADER) + 2 + len(value) > _FOLD_AT:
        value = ";\n\t".join([server_id, *clauses])  # the milter API folds with LF
    return value


def _skip_cfws(text: bytes, pos: int) -> int:
    """Past blanks and (nested) comments with quoted-pairs, as RFC 5322 CFWS."""
    depth = 0
    while pos < len(text):
        ch = text[pos : pos + 1]
        if depth and ch == b"\\":
            pos += 2
            continue
        if ch == b"(":
            depth += 1
        elif ch == b")" and depth:
            depth -= 1
        elif not depth and ch not in (b" ", b"\t", b"\r", b"\n"):
            return pos
        pos += 1
    return pos


def header_authserv_id(value: bytes) -> str | None:
    """The authserv-id an Authentication-Results value starts with: a token or a
    quoted-string, after any comments (RFC 8601 2.2), lower-cased."""
    pos = _skip_cfws(value, 0)
    if value[pos : pos + 1] == b'"':
        out = bytearray()
        pos += 1
        while pos < len(value) and value[pos : pos + 1] != b'"':
            if value[pos : pos + 1] == b"\\":
                pos += 1
            out += value[pos : pos + 1]
            pos += 1
        ident = bytes(out).strip()
    else:
        m = re.compile(rb"[^\s;()\"]+").match(value, pos)
        ident = m.group(0) if m else b""
    return ident.decode("ascii", "replace").lower() or None


def forged_results(headers: Sequence[tuple[bytes, bytes]], server_id: str) -> list[int]:
    """1-based indexes, among the Authentication-Results fields, of those claiming our id."""
    forged = []
    index = 0
    for name, value in headers:
        if name.strip().lower() == AR_HEADER.lower().encode():
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
