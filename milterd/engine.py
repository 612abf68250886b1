"""What milterd does with one message, without the milter protocol: sign or verify.

The adapter (milterd/milter.py) hands over the client facts, the header fields and the body
and applies the returned `Changes`. Everything loaded once per process lives here: the keys
(parsed at start, never per message), the DNS function and the settings.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from postwarden.config.model import Config
from postwarden.config.types import IPNetwork
from postwarden.dkim_keys import (
    DkimKeyError,
    SigningKey,
    load_key,
    normalise_domain,
    signing_keys,
)
from postwarden.dkim_signing import (
    SigningError,
    from_domain,
    keys_for_domain,
    sign,
    signing_candidates,
)
from postwarden.dkim_verify import (
    AR_HEADER,
    DnsFunc,
    authserv_id,
    forged_results,
    log_results,
    make_dnsfunc,
    results_header,
    verify_message,
)

log = logging.getLogger("postwarden.milterd")


class MessageFault(Exception):
    """This message cannot be handled as configured: answer per `milterd.on_error`."""


@dataclass
class Changes:
    """Header edits for the MTA: fields to put at the top (in order) and A-R fields to remove."""

    add: list[tuple[str, str]] = field(default_factory=list)
    remove_results: list[int] = field(default_factory=list)  # 1-based among A-R fields
    summary: str = ""


@dataclass
class Envelope:
    """What the MTA told us about the client before the message."""

    client_ip: str | None = None
    auth_authen: str | None = None
    queue_id: str = "NOQUEUE"


def _in_networks(ip: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def _header_value(value: bytes) -> bytes:
    # The MTA folds with bare LF (or CRLF); dkimpy's relaxed canonicalisation unfolds CRLF only.
    return (
        b" " + value.replace(b"\r\n", b"\n").replace(b"\r", b"").replace(b"\n", b"\r\n") + b"\r\n"
    )


def _milter_value(value: bytes) -> str:
    # Postfix writes "Name: value" itself and folds on LF.
    return value.lstrip().replace(b"\r\n", b"\n").decode("ascii")


class Engine:
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
        """Sign outgoing or verify inbound mail; raises MessageFault."""
        if self.is_outgoing(envelope):
            return self._sign(envelope, headers, body) if self.sign_enabled else Changes()
        return self._verify(envelope, headers, body) if self.verify_enabled else Changes()

    def _sign(
        self, envelope: Envelope, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> Changes:
        dkim_headers = [[name, _header_value(value)] for name, value in headers]
        domain = from_domain(dkim_headers)
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
            return Changes(summary=f"not signed: no key for {domain}")
        signing_domain, keys = chosen
        try:
            signatures = sign(dkim_headers, body, keys)
        except SigningError as exc:
            raise MessageFault(str(exc)) from None
        add = [("DKIM-Signature", _milter_value(sig.value)) for sig in signatures]
        selectors = ",".join(f"{s.selector}/{s.algorithm}" for s in signatures)
        return Changes(add=add, summary=f"signed d={signing_domain} s={selectors}")

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
        forged = forged_results(headers, self.server_id)
        summary = " ".join(
            f"dkim={r.result}" + (f" d={r.domain}" if r.domain else "") for r in results
        )
        summary = summary or "dkim=none"
        if forged:
            summary += f"; removed {len(forged)} forged {AR_HEADER}"
        return Changes(
            add=[(AR_HEADER, value)],
            remove_results=forged,
            summary=summary,
        )
