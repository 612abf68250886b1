"""What milterd does with one message, without the milter protocol: sign or verify.

The adapter (milterd/milter.py) hands over the client facts, the header fields and the body
and applies the returned `Changes`. Everything loaded once per process lives here: the keys
(parsed at start, never per message), the DNS function and the settings.

Contract: docs/ARCHITECTURE.md, "What each daemon owns".
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from postwarden.config.model import Config
from postwarden.config.types import IPNetwork
from postwarden.dkim.keys import (
    DkimKeyError,
    SigningKey,
    load_key,
    normalise_domain,
    signing_keys,
)
from postwarden.dkim.signing import (
    LINE_LIMIT,
    SigningError,
    break_long_lines,
    fold_header,
    from_address,
    from_domain,
    keys_for_domain,
    sign,
    sign_headers_for,
    signing_candidates,
)
from postwarden.dkim.verification import (
    AR_HEADER,
    DnsFunc,
    authserv_id,
    forged_results,
    log_results,
    make_dnsfunc,
    results_header,
    verify_message,
)
from postwarden.policy.sender_identity import may_use_from_address
from postwarden.syntax.ip_addresses import parse_client_ip
from postwarden.syntax.untrusted_text import sanitise

log = logging.getLogger("postwarden.milterd")
# Sender-chosen text (a From domain) in a log line or SMTP reply: one line, bounded.
LOG_LIMIT = 255
_DOMAIN_TEXT = re.compile(r"[a-z0-9_.-]{1,253}")
# RFC 5322 ftext: printable ASCII but ":". Postfix hands over nothing else as a field name
# (its is_header()); a name starting with a blank would be a fold of the field before it.
_FIELD_NAME = re.compile(rb"[!-9;-~]+")


class MessageFault(Exception):
    """This message cannot be handled as configured: answer per `milterd.on_error`."""


class MessageRule(StrEnum):
    """What decided what milterd did with a message: the `rule=` of its log line."""

    SIGN = "sign"  # outgoing (login, trusted network or local) and signed
    NO_KEY = "no_key"  # outgoing, no key for the From: domain: passed on unsigned
    SIGN_OFF = "sign_off"  # outgoing, dkim.sign is off: unsigned
    FROM_MISMATCH = "from_mismatch"  # the login may not use the From: address
    VERIFY = "verify"  # inbound: signatures checked, Authentication-Results added
    VERIFY_OFF = "verify_off"  # inbound, dkim.verify is off: passed on as it is


@dataclass
class Changes:
    """What the MTA is to do with the message, in the order the adapter applies it, and
    what the message's log line says about it (`log_fields()`).

    Header values are as the milter API holds them: no leading space, folds as LF.
    """

    add: list[tuple[str, str]] = field(default_factory=list)  # fields to put at the top
    remove_results: list[int] = field(default_factory=list)  # 1-based among A-R fields
    # Signed headers refolded to what Postfix will deliver: (name, 1-based index among the
    # fields of that name, new value).
    refold: list[tuple[str, int, str]] = field(default_factory=list)
    body: bytes | None = None  # the new body, when long lines had to be broken
    reject: str | None = None  # "550 5.7.1 <this text>" instead of delivery
    rule: MessageRule = MessageRule.SIGN
    # The DKIM domain: the d= we signed with or of each signature checked; for mail left
    # unsigned (or without signatures), the From: domain. None: no From: domain either.
    domains: tuple[str, ...] = ()
    selectors: tuple[str, ...] = ()  # the s= of each signature added or checked
    # signed | unsigned | rejected (outgoing); pass | fail | none | temperror | permerror |
    # neutral | policy per signature checked, or unverified (inbound)
    dkim: str = "none"

    def log_fields(self) -> tuple[tuple[str, str], ...]:
        """`domain=, selector=, dkim=, rule=` and, when they happened, `long_lines=broken`
        (lines over 998 octets broken as Postfix would) and `forged_ar_removed=N`.

        Several signatures: their values joined by "/", in order. A value not known: "-".
        """
        fields = [
            ("domain", "/".join(self.domains) or "-"),
            ("selector", "/".join(self.selectors) or "-"),
            ("dkim", self.dkim),
            ("rule", self.rule.value),
        ]
        if self.body is not None or self.refold:
            fields.append(("long_lines", "broken"))
        if self.remove_results:
            fields.append(("forged_ar_removed", str(len(self.remove_results))))
        return tuple(fields)

    @property
    def summary(self) -> str:
        """The log fields as one line of text (sanitised: the sender chose some of them)."""
        return ", ".join(
            f"{name}={sanitise(value, LOG_LIMIT)}" for name, value in self.log_fields()
        )


@dataclass
class Envelope:
    """What the MTA told us about the client before the message."""

    client_ip: str | None = None
    auth_authen: str | None = None
    queue_id: str = "NOQUEUE"
    # MAIL FROM, which Postfix has bound to auth_authen on 587/465 (sender login maps).
    mail_from: str | None = None


def _in_networks(ip: str, networks: Sequence[IPNetwork]) -> bool:
    addr = parse_client_ip(ip.strip("[]"))  # the one IPv4-mapped rule (postwarden.syntax)
    return addr is not None and any(addr in net for net in networks)


def _header_value(value: bytes) -> bytes:
    # The MTA folds with bare LF (or CRLF); dkimpy's relaxed canonicalisation unfolds CRLF only.
    return (
        b" " + value.replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\n", b"\r\n") + b"\r\n"
    )


def _milter_value(value: bytes) -> str:
    # Postfix writes "Name: value" itself and folds on LF.
    return value.lstrip().replace(b"\r\n", b"\n").decode("ascii")


class MessageHandler:
    """Per-process state: loaded keys, resolver and settings."""

    def __init__(
        self,
        config: Config,
        dnsfunc: DnsFunc | None = None,
        keys: Sequence[SigningKey] | None = None,
    ) -> None:
        self.config = config
        self.sign_enabled = config.dkim.sign
        self.verify_enabled = config.dkim.verify
        self.subdomains = config.dkim.sign_subdomains
        self.trusted = list(config.network.trusted)
        self.server_id = authserv_id(config)
        self.dns_timeout = config.dns.timeout
        self.dnsfunc = dnsfunc if dnsfunc is not None else make_dnsfunc(config.dns)
        # A key that fails to load does not stop the daemon: mail of its domain gets
        # on_error (one log line each), every other domain is signed as usual.
        # Only the entry that would sign matters: the last per domain and algorithm (rotation),
        # so an old selector whose file is already gone does not stop the new one signing.
        self.broken: dict[str, DkimKeyError] = {}
        loaded: list[SigningKey] = list(keys or [])
        if keys is None:
            entries = config.dkim.keys
            signing = {(normalise_domain(e.domain), e.algorithm): i for i, e in enumerate(entries)}
            for index, entry in enumerate(entries):
                domain = normalise_domain(entry.domain)
                try:
                    loaded.append(load_key(entry))
                    if entry.key.stat().st_mode & 0o077:
                        log.warning("DKIM key %s is readable by others; make it 0600", entry.key)
                except DkimKeyError as exc:
                    if signing[(domain, entry.algorithm)] != index:
                        log.warning(
                            "%s; unused: a later %s key signs for %s", exc, entry.algorithm, domain
                        )
                        continue
                    log.error("%s; mail from %s gets milterd.on_error", exc, domain)
                    self.broken[domain] = exc
        self.keys = signing_keys([k for k in loaded if k.domain not in self.broken])
        if self.sign_enabled:
            self._warn_unsigned(config.mail.local_domains)

    def _warn_unsigned(self, domains: Sequence[str]) -> None:
        """Say at start which of our own mail domains would leave unsigned (no key at all)."""
        for domain in domains:
            covered = keys_for_domain(domain, self.keys, subdomains=self.subdomains)
            if covered is None and domain not in self.broken:
                log.warning("mail domain %s has no DKIM key: its mail leaves unsigned", domain)

    def is_outgoing(self, envelope: Envelope) -> bool:
        """SASL-authenticated, or from a trusted network, or injected locally (no client IP)."""
        if envelope.auth_authen:
            return True
        if envelope.client_ip is None:
            return True  # the sendmail command / pickup: local users, outgoing
        return _in_networks(envelope.client_ip, self.trusted)

    def process(
        self, envelope: Envelope, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Changes:
        """Sign outgoing or verify inbound mail; raises MessageFault.

        On every path, signed or not, Authentication-Results claiming our authserv-id are
        removed: only the one we add may carry it. A field name that is not one (empty,
        blanks, control or 8-bit characters) is a MessageFault on every path: neither the
        signer nor dkimpy's parser can tell where such a field begins.
        """
        _check_field_names(headers)
        forged = self.forged(headers)
        if self.is_outgoing(envelope):
            changes = self._outgoing(envelope, headers, body)
        elif self.verify_enabled:
            changes = self._verify(envelope, headers, body)
        else:
            changes = Changes(
                rule=MessageRule.VERIFY_OFF, domains=_from_domains(headers), dkim="unverified"
            )
        if forged and changes.reject is None:
            changes.remove_results = forged
        return changes

    def forged(self, headers: Sequence[tuple[bytes, bytes]]) -> list[int]:
        """Indexes (1-based, among A-R fields) of the Authentication-Results claiming our id."""
        return forged_results(headers, self.server_id)

    def _outgoing(
        self, envelope: Envelope, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Changes:
        dkim_headers = [[name, _header_value(value)] for name, value in headers]
        domain = from_domain(dkim_headers)
        address = from_address(dkim_headers)
        shown = () if domain is None else (domain,)
        login = envelope.auth_authen
        if login and (domain is None or address is None or not self._may_use(envelope, address)):
            what = (
                "From: must hold exactly one address"
                if domain is None
                else f"From: address in domain {_reply_domain(domain)} is not one this login "
                "may use"
            )
            rejected = self.config.milterd.from_mismatch == "reject"
            return Changes(
                reject=what if rejected else None,
                rule=MessageRule.FROM_MISMATCH,
                domains=shown,
                dkim="rejected" if rejected else "unsigned",
            )
        if not self.sign_enabled:
            return Changes(rule=MessageRule.SIGN_OFF, domains=shown, dkim="unsigned")
        if domain is None:
            raise MessageFault("outgoing message without a single parsable From address")
        # The most specific domain with any configured key decides, as in keys_for_domain.
        for candidate in signing_candidates(domain, subdomains=self.subdomains):
            if candidate in self.broken:
                raise MessageFault(f"cannot sign for {domain}: {self.broken[candidate]}")
            if candidate in self.keys:
                break
        chosen = keys_for_domain(domain, self.keys, subdomains=self.subdomains)
        if chosen is None:
            return Changes(rule=MessageRule.NO_KEY, domains=shown, dkim="unsigned")
        signing_domain, keys = chosen
        include = sign_headers_for(dkim_headers)
        refold = _refold(headers, frozenset(include))
        for position, new_value in refold.items():
            dkim_headers[position][1] = _header_value(new_value)
        new_body = break_long_lines(body)
        try:
            signed_body = body if new_body is None else new_body
            signatures = sign(dkim_headers, signed_body, keys, include_headers=include)
        except SigningError as exc:
            raise MessageFault(str(exc)) from None
        add = [("DKIM-Signature", _milter_value(sig.value)) for sig in signatures]
        return Changes(
            add=add,
            refold=_by_name(headers, refold),
            body=new_body,
            rule=MessageRule.SIGN,
            domains=tuple(signing_domain for _ in signatures),
            selectors=tuple(s.selector for s in signatures),
            dkim="signed",
        )

    def _may_use(self, envelope: Envelope, address: str) -> bool:
        assert envelope.auth_authen is not None
        return may_use_from_address(
            envelope.auth_authen, address, self.config.mail.sender_grants, envelope.mail_from
        )

    def _verify(
        self, envelope: Envelope, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Changes:
        message = (
            b"".join(name + b":" + _header_value(value) for name, value in headers) + b"\r\n" + body
        )
        results = verify_message(message, self.dnsfunc, timeout=self.dns_timeout)
        if self.config.milterd.on_error == "tempfail":
            for item in results:
                if item.result == "temperror":
                    raise MessageFault(f"d={item.domain} s={item.selector}: {item.reason}")
        log_results(results, envelope.queue_id)
        value = results_header(self.server_id, results)
        checked = [r for r in results if r.result != "none"]
        if not checked:
            return Changes(
                add=[(AR_HEADER, value)],
                rule=MessageRule.VERIFY,
                domains=_from_domains(headers),
                dkim="none",
            )
        return Changes(
            add=[(AR_HEADER, value)],
            rule=MessageRule.VERIFY,
            domains=tuple(r.domain or "-" for r in checked),
            selectors=tuple(r.selector or "-" for r in checked),
            dkim="/".join(r.result for r in checked),
        )


def _check_field_names(headers: Sequence[tuple[bytes, bytes]]) -> None:
    for position, (name, _) in enumerate(headers, start=1):
        if _FIELD_NAME.fullmatch(name) is None:
            shown = sanitise(name, 80)
            raise MessageFault(f"malformed header field name {shown!r} (field {position})")


def _from_domains(headers: Sequence[tuple[bytes, bytes]]) -> tuple[str, ...]:
    """The From: domain, for the log line of a message without signatures."""
    domain = from_domain([[name, _header_value(value)] for name, value in headers])
    return () if domain is None else (domain,)


def _reply_domain(domain: str) -> str:
    # An SMTP reply carries it: a plain domain name, or nothing of what the sender wrote.
    return domain if _DOMAIN_TEXT.fullmatch(domain) else "(not a domain name)"


def _refold(headers: Sequence[tuple[bytes, bytes]], signed: frozenset[bytes]) -> dict[int, bytes]:
    """Positions and new values of the signed header fields Postfix would cut (> 998 octets)."""
    refold: dict[int, bytes] = {}
    for position, (name, value) in enumerate(headers):
        if name.lower() not in signed or len(name) + len(value) + 2 <= LINE_LIMIT:
            continue  # the common case, without looking at the lines
        new_value = fold_header(name, value)
        if new_value is None:
            continue
        try:
            new_value.decode("utf-8")
        except UnicodeDecodeError:
            # The milter API takes text: a field that is not UTF-8 cannot be rewritten.
            raise MessageFault(
                f"cannot fold the {sanitise(name, 80)} field (over {LINE_LIMIT} octets, not UTF-8)"
            ) from None
        refold[position] = new_value
    return refold


def _by_name(
    headers: Sequence[tuple[bytes, bytes]], refold: dict[int, bytes]
) -> list[tuple[str, int, str]]:
    """(name, index among the fields of that name, value): how the milter API names a field."""
    out = []
    for position, new_value in sorted(refold.items()):
        name = headers[position][0]
        index = sum(1 for n, _ in headers[: position + 1] if n.lower() == name.lower())
        out.append((name.decode("ascii", "replace"), index, new_value.decode("utf-8")))
    return out
