"""`check dns` scoring: each check's pass/fail, what to publish, and the 10-point sum."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postwarden.dns.readiness_report import (
    MAX_SCORE,
    CheckResult,
    DkimFact,
    DnsFacts,
    DnsReportError,
    build_report,
    dkim_record,
)

IP = "192.0.2.25"
DKIM = "v=DKIM1; k=rsa; p=MIIBIjANBgkqh"

READY = DnsFacts(
    domain="example.com",
    hostname="mx.example.com",
    ip=IP,
    a_records=(IP,),
    mx_hosts=((10, "mx.example.com"),),
    mx_addresses={"mx.example.com": (IP,)},
    ptr_names=("mx.example.com",),
    ptr_addresses={"mx.example.com": (IP,)},
    txt_records=("google-site-verification=abc", "v=spf1 a mx -all"),
    dmarc_records=("v=DMARC1; p=quarantine; rua=mailto:postmaster@example.com",),
    dkim=(DkimFact("s1", DKIM, ("v=DKIM1; k=rsa; p=MIIBIjAN BgkqH".replace("H", "h"),)),),
)


def result(facts: DnsFacts, name: str) -> CheckResult:
    return next(c for c in build_report(facts).checks if c.name == name)


def test_ready_domain_scores_ten() -> None:
    report = build_report(READY)
    assert report.score == MAX_SCORE == 10
    assert report.all_passed
    assert report.lines()[-1] == "score: 10/10"


def test_empty_domain_scores_zero_and_says_what_to_publish() -> None:
    facts = DnsFacts(domain="example.com", hostname="mx.example.com", ip=IP)
    report = build_report(facts)
    assert report.score == 0
    publish = {c.name: c.publish for c in report.checks}
    assert publish["A"] == ("example.com. IN A 192.0.2.25",)
    assert publish["MX"] == ("example.com. IN MX 10 mx.example.com.",)
    assert publish["PTR"][0].startswith("25.2.0.192.in-addr.arpa. IN PTR mx.example.com.")
    # Neither A nor MX names the IP yet, so the suggestion lists it.
    assert publish["SPF"] == ('example.com. IN TXT "v=spf1 a mx ip4:192.0.2.25 -all"',)
    assert publish["DMARC"] == (
        '_dmarc.example.com. IN TXT "v=DMARC1; p=quarantine; '
        'rua=mailto:postmaster@example.com; adkim=r; aspf=r"',
    )
    assert "postwarden dkim keygen example.com" in result(facts, "DKIM").found


def test_spf_suggestion_is_plain_when_a_and_mx_cover_the_ip() -> None:
    facts = replace(READY, txt_records=())
    assert result(facts, "SPF").publish == ('example.com. IN TXT "v=spf1 a mx -all"',)


@pytest.mark.parametrize(
    ("records", "why"),
    [
        (("v=spf1 a mx -all", "v=spf1 -all"), "2 v=spf1 records"),
        (("v=spf1 a mx +all",), "does not end in -all or ~all"),
        (("v=spf1 a mx ?all",), "does not end in -all or ~all"),
        (("v=spf1 ip4:198.51.100.0/24 -all",), "does not allow 192.0.2.25"),
    ],
)
def test_spf_failures(records: tuple[str, ...], why: str) -> None:
    check = result(replace(READY, txt_records=records), "SPF")
    assert not check.passed and check.points == 0
    assert why in check.found


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 ip4:192.0.2.0/24 ~all",
        "v=spf1 include:_spf.provider.example -all",
        # The A record's /24 may hold the gateway: a network, not the address itself.
        "v=spf1 a/24 -all",
        "v=spf1 mx/24 -all",
    ],
)
def test_spf_passes_by_network_or_possible_include(record: str) -> None:
    assert result(replace(READY, txt_records=(record,)), "SPF").passed


def test_mx_elsewhere_fails() -> None:
    facts = replace(
        READY, mx_hosts=((10, "mx.other.example"),), mx_addresses={"mx.other.example": ("1.2.3.4",)}
    )
    check = result(facts, "MX")
    assert not check.passed
    assert "none is this gateway" in check.found


def test_mx_by_address_passes() -> None:
    facts = replace(
        READY, mx_hosts=((5, "mail.example.com"),), mx_addresses={"mail.example.com": (IP,)}
    )
    assert result(facts, "MX").passed


def test_ptr_must_resolve_back() -> None:
    facts = replace(READY, ptr_addresses={"mx.example.com": ("192.0.2.99",)})
    check = result(facts, "PTR")
    assert not check.passed
    assert "does not resolve back" in check.found


def test_ptr_without_ip_fails_with_hint() -> None:
    check = result(replace(READY, ip=None), "PTR")
    assert not check.passed and "--ip" in check.found
    assert check.publish == (
        "<the gateway IP, reversed>.in-addr.arpa. IN PTR mx.example.com."
        "  (set by whoever owns the IP: ask your hosting provider)",
    )


def test_ptr_without_ip_says_the_lookup_failed() -> None:
    facts = replace(READY, ip=None, errors={"PTR": "A mx.example.com: timed out"})
    check = result(facts, "PTR")
    assert not check.passed
    assert check.found == "lookup failed: A mx.example.com: timed out"


def test_dkim_other_key_published_fails() -> None:
    facts = replace(READY, dkim=(DkimFact("s1", DKIM, ("v=DKIM1; k=rsa; p=OTHER",)),))
    check = result(facts, "DKIM")
    assert not check.passed
    assert "differs" in check.found
    assert check.publish == (f'{"s1._domainkey.example.com"}. IN TXT "{DKIM}"',)


def test_dkim_missing_selector_fails() -> None:
    assert "s1: no record" in result(replace(READY, dkim=(DkimFact("s1", DKIM),)), "DKIM").found


@pytest.mark.parametrize(
    ("records", "why"),
    [
        ((), "no v=DMARC1 record"),
        (("v=DMARC1; p=none",), "p=none protects nothing"),
        (("v=DMARC1; p=reject", "v=DMARC1; p=quarantine"), "2 records"),
    ],
)
def test_dmarc_failures(records: tuple[str, ...], why: str) -> None:
    check = result(replace(READY, dmarc_records=records), "DMARC")
    assert not check.passed and why in check.found


def test_failed_lookup_fails_the_check_with_the_reason() -> None:
    facts = replace(READY, errors={"SPF": "TXT example.com: timed out"})
    check = result(facts, "SPF")
    assert not check.passed
    assert check.found == "lookup failed: TXT example.com: timed out"
    assert build_report(facts).score == 8


def test_long_txt_is_split_into_255_byte_strings() -> None:
    long_key = "v=DKIM1; k=rsa; p=" + "A" * 400
    check = result(replace(READY, dkim=(DkimFact("s1", long_key),)), "DKIM")
    line = check.publish[0]
    strings = re.findall(r'"([^"]*)"', line)
    assert [len(s) for s in strings] == [255, len(long_key) - 255]
    assert "".join(strings) == long_key


def test_json_form() -> None:
    data = build_report(READY).as_json()
    assert data["score"] == 10 and data["max_score"] == 10
    assert [c["check"] for c in data["checks"]] == ["A", "MX", "PTR", "SPF", "DKIM", "DMARC"]


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_dkim_record_from_rsa_and_ed25519_keys() -> None:
    rsa_record = dkim_record(_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    assert rsa_record.startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA")
    ed_record = dkim_record(_pem(ed25519.Ed25519PrivateKey.generate()))
    assert ed_record.startswith("v=DKIM1; k=ed25519; p=")
    assert len(ed_record.split("p=")[1]) == 44  # 32 raw bytes, base64


def test_dkim_record_of_garbage_is_an_error() -> None:
    with pytest.raises(DnsReportError):
        dkim_record(b"not a key")
