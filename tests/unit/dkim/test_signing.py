"""DKIM signing: byte-identical to dkimpy, verifiable, From oversigned, no l=, domain choice."""

from __future__ import annotations

import base64
import random
import time
from pathlib import Path
from unittest import mock

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postwarden.dkim.keys import Algorithm, PrivateKey, SigningKey, generate_key, key_pem
from postwarden.dkim.signing import (
    OVERSIGNED,
    SigningError,
    canonical_body,
    from_domain,
    keys_for_domain,
    parse_message,
    sign,
    sign_headers_for,
)
from postwarden.dkim.verification import (
    MAX_SIGNATURES,
    DnsFunc,
    KeyNotFoundError,
    results_header,
    verify_message,
)

NOW = 1_760_000_000

MESSAGES = {
    "plain": (
        b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
        b"Date: Tue, 01 Jan 2030 00:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHi Bob.\r\n"
    ),
    "folded-and-spaced": (
        b"Received: from x by y; Tue, 01 Jan 2030 00:00:00 +0000\r\n"
        b'From:   "Alice A."   <alice@example.com>\r\n'
        b"To: bob@example.net,\r\n\tcarol@example.org\r\n"
        b"Cc: dave@example.net\r\n"
        b"Subject: a   very    long subject line that goes on and on and on and on and on\r\n"
        b"  and continues here\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b"Line with trailing spaces   \r\n\ttabbed   line\r\n\r\n\r\n\r\n"
    ),
    "list-and-8bit": (
        b"From: list@example.com\r\nTo: members@example.com\r\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nX-Eight: caf\xc3\xa9 \xff\r\n"
        b"List-Id: <list.example.com>\r\nList-Unsubscribe: <mailto:u@example.com>\r\n"
        b"Reply-To: list@example.com\r\nIn-Reply-To: <0@example.com>\r\n"
        b"References: <0@example.com>\r\n\r\n" + b"body line\r\n" * 800
    ),
    "empty-body": b"From: a@example.com\r\nSubject: nothing\r\n\r\n",
    "lf-only": b"From: a@example.com\nTo: b@example.net\nSubject: unix\n\nline one\nline two\n",
}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    key = generate_key("rsa-sha256")
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    key = generate_key("ed25519-sha256")
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


def _signing_key(key: PrivateKey, selector: str = "s1", domain: str = "example.com") -> SigningKey:
    algorithm: Algorithm = "rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else "ed25519-sha256"
    return SigningKey(domain, selector, algorithm, Path("/unused"), key)


def _dkimpy_private(key: PrivateKey) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key_pem(key)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return base64.b64encode(raw)  # dkimpy's Ed25519 key format


def _dnsfunc(*keys: SigningKey) -> DnsFunc:
    zone = {f"{k.record_name}.".encode(): k.txt_record().encode() for k in keys}

    def lookup(name: bytes, timeout: float = 5.0) -> bytes:
        if name not in zone:
            raise KeyNotFoundError(name.decode())
        return zone[name]

    return lookup


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_signature_is_byte_identical_to_dkimpys(
    name: str, algorithm: str, rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    key = rsa_key if algorithm == "rsa" else ed_key
    signing_key = _signing_key(key)
    message = MESSAGES[name]
    headers, body = parse_message(message)
    ours = sign(headers, body, [signing_key], timestamp=NOW)[0].field
    with mock.patch("time.time", return_value=float(NOW)):
        theirs = dkim.DKIM(message).sign(
            b"s1",
            b"example.com",
            _dkimpy_private(key),
            signature_algorithm=signing_key.algorithm.encode(),
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(sign_headers_for(headers)),
        )
    assert ours == theirs


def test_default_header_list_is_dkimpys_recommendation_then_every_oversigned_name() -> None:
    headers, _ = parse_message(MESSAGES["list-and-8bit"])
    with mock.patch("time.time", return_value=float(NOW)):
        checker = dkim.DKIM(MESSAGES["list-and-8bit"])
        checker.frozen_sign = set()  # dkimpy's choice of present headers, none signed twice
        recommended = [h.lower() for h in checker.default_sign_headers()]
    ours = list(sign_headers_for(headers))
    # The present headers in message order (dkimpy's list), then each oversigned name once,
    # present or not, as OpenDKIM's OversignHeaders does.
    assert ours == recommended + list(OVERSIGNED)
    for name in (b"from", b"subject", b"to", b"cc", b"date", b"reply-to", b"message-id"):
        assert name in OVERSIGNED
    for name in (b"mime-version", b"content-type", b"content-transfer-encoding"):
        assert name in OVERSIGNED
    plain, _ = parse_message(MESSAGES["folded-and-spaced"])
    assert b"received" not in sign_headers_for(plain)
    assert sign_headers_for(plain).count(b"from") == 2
    assert sign_headers_for(plain).count(b"reply-to") == 1  # absent: signed as absent


def test_rsa_signing_is_done_by_openssl_not_pure_python(rsa_key: rsa.RSAPrivateKey) -> None:
    headers, body = parse_message(MESSAGES["plain"])
    signing_key = _signing_key(rsa_key)
    rounds = 10
    start = time.perf_counter()
    for _ in range(rounds):
        sign(headers, body, [signing_key])
    ours = time.perf_counter() - start
    pem = key_pem(rsa_key)
    start = time.perf_counter()
    for _ in range(rounds):
        dkim.DKIM(MESSAGES["plain"]).sign(b"s1", b"example.com", pem)
    theirs = time.perf_counter() - start
    assert ours * 3 < theirs, (ours, theirs)


def test_dual_signature_verifies_and_has_no_length_tag(
    rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey
) -> None:
    keys = [_signing_key(rsa_key, "r1"), _signing_key(ed_key, "e1")]
    message = MESSAGES["folded-and-spaced"]
    headers, body = parse_message(message)
    signatures = sign(headers, body, keys)
    assert [s.algorithm for s in signatures] == ["rsa-sha256", "ed25519-sha256"]
    for signature in signatures:
        tags = dkim.util.parse_tag_value(signature.value.strip())
        assert b"l" not in tags
        assert tags[b"c"] == b"relaxed/relaxed"
        signed_names = b"".join(tags[b"h"].split()).split(b":")
        assert signed_names.count(b"from") == 2
    signed = b"".join(s.field for s in signatures) + message
    results = verify_message(signed, _dnsfunc(*keys))
    assert [(r.result, r.selector) for r in results] == [("pass", "r1"), ("pass", "e1")]
    assert results_header("mx.test", results).startswith("mx.test; dkim=pass header.d=example.com")


def test_oversigned_from_blocks_an_added_from(rsa_key: rsa.RSAPrivateKey) -> None:
    key = _signing_key(rsa_key)
    message = MESSAGES["plain"]
    headers, body = parse_message(message)
    signature = sign(headers, body, [key])[0].field
    assert verify_message(signature + message, _dnsfunc(key))[0].result == "pass"
    forged = signature + b"From: mallory@evil.test\r\n" + message
    assert verify_message(forged, _dnsfunc(key))[0].result == "fail"
    tampered = signature + message.replace(b"Hi Bob.", b"Hi Bob!")
    failed = verify_message(tampered, _dnsfunc(key))[0]
    assert (failed.result, failed.reason) == ("fail", "body hash mismatch")


def test_a_message_without_from_is_not_signed(rsa_key: rsa.RSAPrivateKey) -> None:
    headers, body = parse_message(b"To: b@example.net\r\nSubject: x\r\n\r\nbody\r\n")
    with pytest.raises(SigningError, match="no From"):
        sign(headers, body, [_signing_key(rsa_key)])


@pytest.mark.parametrize(
    ("from_value", "expected"),
    [
        (b" Alice <alice@Example.COM>\r\n", "example.com"),
        (b" bob@mail.example.com\r\n", "mail.example.com"),
        (b' "Last, First" <x@example.org.>\r\n', "example.org"),
        (b" a@example.com, b@example.net\r\n", None),  # two authors: no single domain
        (b" undisclosed\r\n", None),
    ],
)
def test_from_domain(from_value: bytes, expected: str | None) -> None:
    assert from_domain([[b"From", from_value]]) == expected


def test_from_domain_needs_exactly_one_from() -> None:
    assert from_domain([[b"From", b" a@example.com\r\n"], [b"From", b" b@example.com\r\n"]]) is None
    assert from_domain([[b"To", b" a@example.com\r\n"]]) is None


def test_signing_domain_choice(rsa_key: rsa.RSAPrivateKey) -> None:
    key = _signing_key(rsa_key)
    keys = {"example.com": [key]}
    assert keys_for_domain("example.com", keys, subdomains=False) == ("example.com", [key])
    assert keys_for_domain("mail.example.com", keys, subdomains=False) is None
    assert keys_for_domain("mail.example.com", keys, subdomains=True) == ("example.com", [key])
    assert keys_for_domain("a.b.example.com", keys, subdomains=True) == ("example.com", [key])
    assert keys_for_domain("example.net", keys, subdomains=True) is None
    assert keys_for_domain("com", keys, subdomains=True) is None


def test_canonical_body_equals_dkimpys_relaxed_body() -> None:
    """The skipped regex passes are identities: same bytes as dkimpy on every input."""
    relaxed = dkim.canonicalization.Relaxed.canonicalize_body
    pieces = [b"a", b"bc", b" ", b"  ", b"\t", b"\r\n", b"\r", b"\n", b" \r\n", b"\t\r\n", b"\xff"]
    rng = random.Random(1)
    bodies = [b"", b"\r\n", b"\r\n\r\n", b"x", b"x \r\n", b"x\t\r\n\r\n", *MESSAGES.values()]
    bodies += [b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for body in bodies:
        assert canonical_body(body) == relaxed(body), body


def test_a_hostile_reason_stays_one_quoted_ascii_line(rsa_key: rsa.RSAPrivateKey) -> None:
    """Reasons quote the message (tag values, names): no line break, quote or 8-bit escapes."""
    key = _signing_key(rsa_key)
    headers, body = parse_message(MESSAGES["plain"])
    signed = sign(headers, body, [key])[0].field + MESSAGES["plain"]

    def hostile(name: bytes, timeout: float = 5.0) -> bytes:
        raise KeyNotFoundError('no key\r\nX-Injected: 1 "\\\xff' + "x" * 500)

    (result,) = verify_message(signed, hostile)
    assert result.result == "permerror"
    assert result.reason.isascii() and result.reason.isprintable()
    assert len(result.reason) <= 200
    value = results_header("mx.test", [result])
    assert "\n" not in value and "\r" not in value and "\\" not in value
    (parsed,) = authres.AuthenticationResultsHeader.parse_value(value).results
    assert parsed.result == "permerror" and parsed.header_d == "example.com"


def test_at_most_max_signatures_are_checked(rsa_key: rsa.RSAPrivateKey) -> None:
    """Each check may wait for DNS: a flood of signatures is cut off, and says so."""
    key = _signing_key(rsa_key)
    headers, body = parse_message(MESSAGES["plain"])
    signature = sign(headers, body, [key])[0].field
    lookups: list[bytes] = []
    zone = _dnsfunc(key)

    def counting(name: bytes, timeout: float = 5.0) -> bytes | None:
        lookups.append(name)
        return zone(name, timeout)

    results = verify_message(signature * (MAX_SIGNATURES + 3) + MESSAGES["plain"], counting)
    assert [r.result for r in results] == ["pass"] * MAX_SIGNATURES + ["policy"]
    assert "3 more signatures not checked" in results[-1].reason
    assert len(lookups) == MAX_SIGNATURES
    assert "dkim=policy" in results_header("mx.test", results)
