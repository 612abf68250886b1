"""`postwarden check dns`: is a domain's DNS ready for mail from this gateway? (pure scoring)

The lookups happen before (`postwarden.dns.readiness_lookups.gather_facts`); this module only judges
the answers. Six checks, each pass or fail with the record to publish, summed to a
10-point score as mail-tester does:

| check | points | passes when                                                          |
| ----- | ------ | -------------------------------------------------------------------- |
| A     | 1      | the domain has an address record                                     |
| MX    | 2      | an MX points at this gateway (its hostname or its IP)                 |
| PTR   | 2      | the gateway's IP has a PTR whose name resolves back to the IP (FCrDNS)|
| SPF   | 2      | exactly one v=spf1 record, ending in -all/~all, that allows the IP    |
| DKIM  | 2      | every configured selector publishes the configured key                |
| DMARC | 1      | a v=DMARC1 record with p=quarantine or p=reject                       |
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from postwarden.dkim.keys import (
    DkimKeyError,
    parse_private_key,
    parse_txt_record,
    quoted_txt,
    txt_record,
)

POINTS = {"A": 1, "MX": 2, "PTR": 2, "SPF": 2, "DKIM": 2, "DMARC": 1}
MAX_SCORE = sum(POINTS.values())


class DnsReportError(Exception):
    """The check cannot run (bad domain or IP, unreadable DKIM key); the text says why."""


@dataclass(frozen=True, slots=True)
class DkimFact:
    selector: str
    # The record this gateway's key needs: "v=DKIM1; k=rsa; p=…".
    expected: str
    published: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DnsFacts:
    """What DNS answered about a domain (empty tuples for "no such record")."""

    domain: str
    hostname: str  # the gateway's name (mail.hostname): the MX target and PTR name
    ip: str | None  # the gateway's public IP, given or found
    a_records: tuple[str, ...] = ()
    mx_hosts: tuple[tuple[int, str], ...] = ()
    mx_addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ptr_names: tuple[str, ...] = ()
    ptr_addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    txt_records: tuple[str, ...] = ()
    dmarc_records: tuple[str, ...] = ()
    dkim: tuple[DkimFact, ...] = ()
    # Lookups that failed (timeout, SERVFAIL) by check name: such a check fails with why.
    errors: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    passed: bool
    points: int
    max_points: int
    found: str  # what DNS says now, or why the check failed
    publish: tuple[str, ...] = ()  # zone-file lines that make it pass

    def as_json(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "passed": self.passed,
            "points": self.points,
            "max_points": self.max_points,
            "found": self.found,
            "publish": list(self.publish),
        }


@dataclass(frozen=True, slots=True)
class DnsReport:
    domain: str
    ip: str | None
    checks: tuple[CheckResult, ...]

    @property
    def score(self) -> int:
        return sum(c.points for c in self.checks)

    @property
    def all_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "ip": self.ip,
            "score": self.score,
            "max_score": MAX_SCORE,
            "checks": [c.as_json() for c in self.checks],
        }

    def lines(self) -> list[str]:
        out = [f"DNS for {self.domain}" + (f" (gateway IP {self.ip})" if self.ip else "")]
        for c in self.checks:
            mark = "pass" if c.passed else "FAIL"
            out.append(f"  [{mark}] {c.name:<6} {c.points}/{c.max_points}  {c.found}")
            out.extend(f"         publish: {line}" for line in c.publish)
        out.append(f"score: {self.score}/{MAX_SCORE}")
        return out


# --- DKIM key -> record -------------------------------------------------------------------


def dkim_record(private_key_pem: bytes) -> str:
    """The DKIM TXT value for a private key (as `postwarden dkim dns` prints it)."""
    try:
        return txt_record(parse_private_key(private_key_pem, "(configured key)"))
    except DkimKeyError as exc:
        raise DnsReportError(str(exc)) from None


def _tags(record: str) -> dict[str, str]:
    return {k.lower(): v for k, v in parse_txt_record(record).items()}


def _zone_txt(name: str, value: str) -> str:
    # Strings over 255 bytes are split, as every DNS TXT record must be.
    return f"{name}. IN TXT {quoted_txt(value)}"


# --- the six checks -----------------------------------------------------------------------


def _result(name: str, passed: bool, found: str, publish: Sequence[str] = ()) -> CheckResult:
    points = POINTS[name]
    return CheckResult(name, passed, points if passed else 0, points, found, tuple(publish))


def _failed_lookup(facts: DnsFacts, name: str, publish: Sequence[str]) -> CheckResult | None:
    error = facts.errors.get(name)
    return None if error is None else _result(name, False, f"lookup failed: {error}", publish)


def check_a(facts: DnsFacts) -> CheckResult:
    target = facts.ip or "<this gateway's IP>"
    rtype = "AAAA" if facts.ip and ":" in facts.ip else "A"
    publish = [f"{facts.domain}. IN {rtype} {target}"]
    if failed := _failed_lookup(facts, "A", publish):
        return failed
    if not facts.a_records:
        return _result("A", False, f"{facts.domain} has no A/AAAA record", publish)
    return _result("A", True, f"{facts.domain} -> {', '.join(facts.a_records)}")


def check_mx(facts: DnsFacts) -> CheckResult:
    publish = [f"{facts.domain}. IN MX 10 {facts.hostname}."]
    if failed := _failed_lookup(facts, "MX", publish):
        return failed
    if not facts.mx_hosts:
        return _result("MX", False, f"{facts.domain} has no MX record", publish)
    listed = ", ".join(f"{pref} {host}" for pref, host in sorted(facts.mx_hosts))
    ours = [
        host
        for _, host in facts.mx_hosts
        if host == facts.hostname
        or (facts.ip is not None and facts.ip in facts.mx_addresses.get(host, ()))
    ]
    if not ours:
        return _result("MX", False, f"MX {listed}: none is this gateway", publish)
    return _result("MX", True, f"MX {listed}")


def check_ptr(facts: DnsFacts) -> CheckResult:
    reverse = (
        "<the gateway IP, reversed>.in-addr.arpa"
        if facts.ip is None
        else ipaddress.ip_address(facts.ip).reverse_pointer
    )
    publish = [
        f"{reverse}. IN PTR {facts.hostname}."
        "  (set by whoever owns the IP: ask your hosting provider)"
    ]
    # Also when the gateway's own address could not be looked up: that is why no IP is known.
    if failed := _failed_lookup(facts, "PTR", publish):
        return failed
    if facts.ip is None:
        found = "no gateway IP known (give --ip or publish an A record)"
        return _result("PTR", False, found, publish)
    if not facts.ptr_names:
        return _result("PTR", False, f"{facts.ip} has no PTR record", publish)
    confirmed = [n for n in facts.ptr_names if facts.ip in facts.ptr_addresses.get(n, ())]
    if not confirmed:
        names = ", ".join(facts.ptr_names)
        return _result(
            "PTR", False, f"{facts.ip} -> {names}, which does not resolve back to it", publish
        )
    return _result("PTR", True, f"{facts.ip} -> {confirmed[0]} -> {facts.ip}")


def _spf_allows(record: str, facts: DnsFacts) -> bool | None:
    """Whether the record's own mechanisms allow the IP; None when an include may."""
    if facts.ip is None:
        return None
    ip = ipaddress.ip_address(facts.ip)
    mx_ips = {a for addrs in facts.mx_addresses.values() for a in addrs}
    maybe = False
    for term in record.split()[1:]:
        mech = term.lstrip("+").lower()
        if term.startswith(("-", "~", "?")):
            continue
        if mech == "a" and facts.ip in facts.a_records:
            return True
        if mech == "mx" and facts.ip in mx_ips:
            return True
        if mech.startswith(("ip4:", "ip6:")):
            try:
                if ip in ipaddress.ip_network(mech[4:], strict=False):
                    return True
            except ValueError:
                continue
        # Mechanisms naming other hosts or prefixes ("a/24" covers the A record's network)
        # need lookups this pure judge does not make: the record may allow the IP.
        if mech == "ptr" or mech.startswith(
            ("include:", "redirect=", "a:", "mx:", "a/", "mx/", "exists:", "ptr:")
        ):
            maybe = True
    return None if maybe else False


def suggested_spf(facts: DnsFacts) -> str:
    mx_ips = {a for addrs in facts.mx_addresses.values() for a in addrs}
    mechanisms = ["a", "mx"]
    if facts.ip and facts.ip not in facts.a_records and facts.ip not in mx_ips:
        mechanisms.append(f"ip{6 if ':' in facts.ip else 4}:{facts.ip}")
    return f"v=spf1 {' '.join(mechanisms)} -all"


def check_spf(facts: DnsFacts) -> CheckResult:
    publish = [_zone_txt(facts.domain, suggested_spf(facts))]
    if failed := _failed_lookup(facts, "SPF", publish):
        return failed
    records = [t for t in facts.txt_records if t.lower().startswith("v=spf1")]
    if not records:
        return _result("SPF", False, "no v=spf1 TXT record", publish)
    if len(records) > 1:
        # RFC 7208 4.5: more than one record is a permerror for every receiver.
        return _result("SPF", False, f"{len(records)} v=spf1 records (must be one)", publish)
    record = " ".join(records[0].split())
    last = record.split()[-1].lower()
    if last not in ("-all", "~all") and not last.startswith("redirect="):
        return _result("SPF", False, f'"{record}" does not end in -all or ~all', publish)
    if _spf_allows(record, facts) is False:
        return _result("SPF", False, f'"{record}" does not allow {facts.ip}', publish)
    return _result("SPF", True, f'"{record}"')


def check_dkim(facts: DnsFacts) -> CheckResult:
    if not facts.dkim:
        return _result(
            "DKIM",
            False,
            f"no DKIM key configured for {facts.domain} "
            f"(run: postwarden dkim keygen {facts.domain})",
        )
    publish = [_zone_txt(f"{d.selector}._domainkey.{facts.domain}", d.expected) for d in facts.dkim]
    if failed := _failed_lookup(facts, "DKIM", publish):
        return failed
    problems = []
    for d in facts.dkim:
        want = _tags(d.expected).get("p")
        got = [_tags(r).get("p") for r in d.published]
        if not d.published:
            problems.append(f"{d.selector}: no record")
        elif want not in got:
            problems.append(f"{d.selector}: published key differs from the configured key")
    if problems:
        return _result("DKIM", False, "; ".join(problems), publish)
    return _result("DKIM", True, "selectors " + ", ".join(d.selector for d in facts.dkim))


def suggested_dmarc(domain: str) -> str:
    return f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}; adkim=r; aspf=r"


def check_dmarc(facts: DnsFacts) -> CheckResult:
    publish = [_zone_txt(f"_dmarc.{facts.domain}", suggested_dmarc(facts.domain))]
    if failed := _failed_lookup(facts, "DMARC", publish):
        return failed
    records = [r for r in facts.dmarc_records if r.replace(" ", "").startswith("v=DMARC1")]
    if len(records) != 1:
        found = "no v=DMARC1 record" if not records else f"{len(records)} records (must be one)"
        return _result("DMARC", False, found, publish)
    policy = _tags(records[0]).get("p", "").lower()
    if policy not in ("quarantine", "reject"):
        return _result(
            "DMARC", False, f'"{records[0]}": p={policy or "?"} protects nothing', publish
        )
    return _result("DMARC", True, f'"{records[0]}"')


def build_report(facts: DnsFacts) -> DnsReport:
    """Judge gathered DNS facts: six pass/fail checks summed to a score out of 10."""
    checks = (
        check_a(facts),
        check_mx(facts),
        check_ptr(facts),
        check_spf(facts),
        check_dkim(facts),
        check_dmarc(facts),
    )
    return DnsReport(facts.domain, facts.ip, checks)
