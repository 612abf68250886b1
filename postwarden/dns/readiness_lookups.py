"""The DNS lookups behind `postwarden check dns`, through the `[dns]` resolver."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import dns.exception
import dns.name
import dns.resolver
import dns.reversename

from postwarden.config.mail import check_domain
from postwarden.config.model import Config
from postwarden.dns.readiness_report import DkimFact, DnsFacts, DnsReportError, dkim_record
from postwarden.dns.resolver import make_sync_resolver

T = TypeVar("T")


class _LookupFailed(Exception):
    pass


def _query(resolver: dns.resolver.Resolver, name: str, rtype: str) -> list[str]:
    """Answers as text; [] for "no such record"; _LookupFailed for timeouts and SERVFAIL."""
    try:
        answer = resolver.resolve(name, rtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.Timeout:
        raise _LookupFailed(f"{rtype} {name}: timed out") from None
    except (dns.resolver.NoNameservers, dns.exception.DNSException) as exc:
        raise _LookupFailed(f"{rtype} {name}: {exc}") from None
    out = []
    for rdata in answer:
        if rtype == "TXT":
            out.append(b"".join(rdata.strings).decode("utf-8", errors="replace"))
        elif rtype == "MX":
            out.append(f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True)}")
        elif rtype == "PTR":
            out.append(rdata.target.to_text(omit_final_dot=True).lower())
        else:
            out.append(rdata.to_text())
    return out


def _addresses(resolver: dns.resolver.Resolver, name: str) -> tuple[str, ...]:
    return tuple(_query(resolver, name, "A") + _query(resolver, name, "AAAA"))


def gather_facts(
    cfg: Config, domain: str, ip: str | None, resolver: dns.resolver.Resolver | None = None
) -> DnsFacts:
    """Look up everything the report judges; a failed lookup is noted, not raised."""
    try:
        domain = check_domain(domain)
    except ValueError as exc:
        raise DnsReportError(str(exc)) from None
    if ip is not None:
        try:
            ip = str(ipaddress.ip_address(ip))
        except ValueError:
            raise DnsReportError(f"--ip {ip!r} is not an IP address") from None
    res = resolver or make_sync_resolver(cfg.dns)
    hostname = cfg.mail.hostname
    errors: dict[str, str] = {}

    def attempt(check: str, default: T, func: Callable[[], T]) -> T:
        try:
            return func()
        except _LookupFailed as exc:
            errors.setdefault(check, str(exc))
            return default

    a_records: tuple[str, ...] = attempt("A", (), lambda: _addresses(res, domain))
    mx_text: list[str] = attempt("MX", [], lambda: _query(res, domain, "MX"))
    mx_hosts = tuple((int(p), h.lower()) for p, h in (t.split(" ", 1) for t in mx_text))
    mx_addresses: dict[str, tuple[str, ...]] = {}
    for _, host in mx_hosts:
        mx_addresses[host] = attempt("MX", (), partial(_addresses, res, host))
    if ip is None:
        # The gateway's IP: its hostname's address, else the domain's.
        own: tuple[str, ...] = attempt("PTR", (), lambda: _addresses(res, hostname))
        ip = (own or a_records or (None,))[0]
    ptr_names: tuple[str, ...] = ()
    ptr_addresses: dict[str, tuple[str, ...]] = {}
    if ip is not None:
        reverse = dns.reversename.from_address(ip).to_text()
        ptr_names = tuple(attempt("PTR", [], lambda: _query(res, reverse, "PTR")))
        for name in ptr_names:
            ptr_addresses[name] = attempt("PTR", (), partial(_addresses, res, name))
    txt: list[str] = attempt("SPF", [], lambda: _query(res, domain, "TXT"))
    dmarc: list[str] = attempt("DMARC", [], lambda: _query(res, f"_dmarc.{domain}", "TXT"))

    dkim = []
    for key in cfg.dkim.keys:
        if key.domain != domain:
            continue
        try:
            expected = dkim_record(key.key.read_bytes())
        except OSError as exc:
            raise DnsReportError(f"DKIM key {key.key}: {exc.strerror}") from None
        name = f"{key.selector}._domainkey.{domain}"
        published: list[str] = attempt("DKIM", [], partial(_query, res, name, "TXT"))
        dkim.append(DkimFact(key.selector, expected, tuple(published)))

    return DnsFacts(
        domain=domain,
        hostname=hostname,
        ip=ip,
        a_records=a_records,
        mx_hosts=mx_hosts,
        mx_addresses=mx_addresses,
        ptr_names=ptr_names,
        ptr_addresses=ptr_addresses,
        txt_records=tuple(txt),
        dmarc_records=tuple(dmarc),
        dkim=tuple(dkim),
        errors=errors,
    )
