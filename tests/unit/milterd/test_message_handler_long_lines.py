"""What milterd signs is what Postfix delivers: lines over 998 octets, the oversigned
headers, and Authentication-Results that parse back to exactly what was found.

`postfix_delivers` below is Postfix 3.7's own delivery path restated: cleanup stores a line
in records of at most line_length_limit (2048) octets (cleanup_out.c), and the SMTP/LMTP
client writes them with smtp_line_length_limit = 998 (smtp_proto.c, smtp_text_out), one
record at a time, so that the tests compare against Postfix's algorithm, not against ours.
"""

from __future__ import annotations

import random
from pathlib import Path

import authres
import dkim
import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterd.message_handler import Envelope, MessageHandler
from postwarden.config.model import Config
from postwarden.dkim.keys import SigningKey, generate_key
from postwarden.dkim.signing import (
    LINE_LIMIT,
    OVERSIGNED,
    break_long_lines,
    fold_header,
    parse_message,
    sign,
)
from postwarden.dkim.verification import (
    DkimResult,
    DnsTemporaryError,
    KeyNotFoundError,
    forged_results,
    header_authserv_id,
    results_header,
    verify_message,
)
from tests.fixtures.milter_client import MilterResult, split_message

RECORD_LIMIT = 2048  # Postfix's line_length_limit


def _smtp_text_out(records: list[tuple[str, bytes]], limit: int = LINE_LIMIT) -> bytes:
    """smtp_proto.c smtp_text_out() for a run of queue-file records (dot-stuffing left out)."""
    out = bytearray()
    space_left = limit
    for rec_type, text in records:
        data = text
        while True:
            if len(data) >= space_left:
                out += data[:space_left] + b"\r\n"
                data = data[space_left:]
                space_left = limit
                if data or rec_type == "CONT":
                    out += b" "
                    space_left -= 1
                if not data:
                    break
            else:
                if rec_type == "CONT":
                    out += data
                    space_left -= len(data)
                else:
                    out += data + b"\r\n"
                    space_left = limit
                break
    return bytes(out)


def _records(line: bytes) -> list[tuple[str, bytes]]:
    """cleanup_out(): a line as REC_TYPE_CONT pieces of 2048 octets and a last REC_TYPE_NORM."""
    pieces = []
    while len(line) > RECORD_LIMIT:
        pieces.append(("CONT", line[:RECORD_LIMIT]))
        line = line[RECORD_LIMIT:]
    return [*pieces, ("NORM", line)]


def postfix_delivers(message: bytes) -> bytes:
    """The message as Postfix's SMTP/LMTP client writes it (CRLF lines in, CRLF lines out)."""
    assert message.endswith(b"\r\n")
    return b"".join(_smtp_text_out(_records(line)) for line in message[:-2].split(b"\r\n"))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("example.com", "s1", "rsa-sha256", Path("/k"), generate_key("rsa-sha256"))


def _dnsfunc(key: SigningKey):  # type: ignore[no-untyped-def]
    zone = {f"{key.record_name}.".encode(): key.txt_record().encode()}

    def lookup(name: bytes, timeout: float = 5.0) -> bytes:
        if name not in zone:
            raise KeyNotFoundError(name.decode())
        return zone[name]

    return lookup


def _engine(key: SigningKey, **sections: dict[str, object]) -> MessageHandler:
    config = Config.model_validate({"mail": {"hostname": "mx.example.org"}, **sections})
    return MessageHandler(config, dnsfunc=_dnsfunc(key), keys=[key])


# --- body lines ------------------------------------------------------------------------------

LENGTHS = [0, 1, 997, 998, 999, 1000, 1995, 1996, 1997, 2047, 2048, 2049, 3000, 4096, 9999]


@pytest.mark.parametrize("length", LENGTHS)
def test_a_body_line_is_broken_exactly_as_postfix_breaks_it(length: int) -> None:
    line = bytes(random.Random(length).choice(b"abc .\t\r") for _ in range(length))
    body = b"before\r\n" + line + b"\r\nafter\r\n"
    broken = break_long_lines(body)
    assert (broken or body) == postfix_delivers(body)
    assert (broken is None) is (length <= LINE_LIMIT)
    if broken is not None:
        # Nothing left for Postfix to do: delivering the broken body changes nothing.
        assert postfix_delivers(broken) == broken
        assert max(len(x) for x in broken.split(b"\r\n")) <= LINE_LIMIT


@given(st.lists(st.integers(0, 5000), min_size=1, max_size=6), st.booleans())
def test_any_body_is_broken_as_postfix_does(lengths: list[int], final_crlf: bool) -> None:
    body = b"\r\n".join(b"x" * n for n in lengths) + (b"\r\n" if final_crlf else b"")
    broken = break_long_lines(body)
    expected_long = any(n > LINE_LIMIT for n in lengths)
    assert (broken is not None) is expected_long
    if final_crlf:
        assert (broken or body) == postfix_delivers(body)


def test_short_lines_cost_no_copy() -> None:
    body = b"The numbers are in.  See you Monday.\r\n" * 1000 + b"x" * 998 + b"\r\n"
    assert break_long_lines(body) is None
    assert break_long_lines(b"x" * 998) is None
    assert break_long_lines(b"x" * 999) == b"x" * 998 + b"\r\n x"  # no final CRLF


# --- header fields ---------------------------------------------------------------------------


def _relaxed(name: bytes, value: bytes) -> bytes:
    policy = dkim.canonicalization.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    crlf = b" " + value.replace(b"\n", b"\r\n") + b"\r\n"
    return bytes(policy.canonicalize_headers([[name, crlf]])[0][1])


def test_a_long_header_is_folded_at_blanks_without_changing_what_is_signed() -> None:
    value = b" ".join(b"word%d" % i for i in range(300))  # ~2,000 octets
    folded = fold_header(b"Subject", value)
    assert folded is not None
    lines = (b"Subject: " + folded).split(b"\n")
    assert len(lines) > 1 and all(len(line) <= LINE_LIMIT for line in lines)
    assert all(line[:1] == b" " for line in lines[1:])
    assert folded.replace(b"\n", b"") == value  # only folds were added
    assert _relaxed(b"Subject", folded) == _relaxed(b"Subject", value)


def test_a_long_header_without_blanks_is_cut_as_postfix_would() -> None:
    value = b"see:" + b"x" * 1200
    folded = fold_header(b"Subject", value)
    assert folded is not None
    message = b"Subject: " + value.replace(b"\n", b"\r\n") + b"\r\n"
    assert (b"Subject: " + folded.replace(b"\n", b"\r\n") + b"\r\n") == postfix_delivers(message)


def test_folding_keeps_utf8_characters_whole_and_existing_folds() -> None:
    value = "é".encode() * 700 + b"\n\tnext"
    folded = fold_header(b"Subject", value)
    assert folded is not None
    for line in folded.split(b"\n"):
        line.decode("utf-8")  # every line is whole UTF-8
    assert folded.endswith(b"\n\tnext")
    assert fold_header(b"Subject", b"short\n\tfolded") is None
    assert fold_header(b"Subject", b"x" * (LINE_LIMIT - len(b"Subject: "))) is None


# --- through the engine: what is signed is what Postfix delivers -----------------------------


def _message(subject: bytes, body: bytes) -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
        b"Subject: " + subject + b"\r\nDate: Tue, 01 Jan 2030 00:00:00 +0000\r\n\r\n" + body
    )


@pytest.mark.parametrize(
    "subject",
    [b"long " * 240, b"see:" + b"x" * 1196, "caf\u00e9 ".encode() * 200],
    ids=["words", "one-token", "utf8"],
)
def test_signed_long_lines_verify_after_postfix_delivery(key: SigningKey, subject: bytes) -> None:
    message = _message(subject, b"short\r\n" + b"B" * 1000 + b"\r\nend\r\n")
    headers, body = split_message(message)
    milter_headers = [(n.encode(), v) for n, v in headers]
    changes = _engine(key).process(Envelope("127.0.0.1"), milter_headers, body)
    assert changes.body is not None and changes.body == postfix_delivers(body)
    ((name, index, _),) = changes.refold
    assert (name, index) == ("Subject", 1)
    result = MilterResult(
        "accept",
        inserted=[(0, n, v.encode()) for n, v in changes.add],
        changed=[(i, n, v.encode()) for n, i, v in changes.refold],
        body=changes.body,
    )
    stored = result.apply(message)
    delivered = postfix_delivers(stored)
    assert delivered == stored  # Postfix has nothing left to break
    assert [r.result for r in verify_message(delivered, _dnsfunc(key))] == ["pass"]
    assert ("long_lines", "broken") in changes.log_fields()


def test_a_signature_of_the_unbroken_message_fails_after_postfix_delivery(
    key: SigningKey,
) -> None:
    """Why the above matters: signed as received, Postfix's breaks make it fail."""
    message = _message(b"long " * 240, b"B" * 1000 + b"\r\n")
    headers, body = parse_message(message)
    signed = sign(headers, body, [key])[0].field + message
    assert [r.result for r in verify_message(signed, _dnsfunc(key))] == ["pass"]
    delivered = postfix_delivers(signed)
    assert [r.result for r in verify_message(delivered, _dnsfunc(key))] == ["fail"]


# --- oversigning -----------------------------------------------------------------------------


REPLAYABLE = [
    "From",
    "Subject",
    "To",
    "Cc",
    "Date",
    "Reply-To",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
]


def test_the_oversigned_list_is_the_replayable_one() -> None:
    assert {n.encode().lower() for n in REPLAYABLE} == set(OVERSIGNED)


@pytest.mark.parametrize("name", REPLAYABLE)
def test_adding_any_oversigned_header_breaks_the_signature(key: SigningKey, name: str) -> None:
    message = (
        b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n"
        b"Date: Tue, 01 Jan 2030 00:00:00 +0000\r\n\r\nbody\r\n"
    )
    headers, body = split_message(message)
    changes = _engine(key).process(
        Envelope("127.0.0.1"), [(n.encode(), v) for n, v in headers], body
    )
    ((_, signature),) = changes.add
    signed = b"DKIM-Signature: " + signature.encode().replace(b"\n", b"\r\n") + b"\r\n" + message
    assert [r.result for r in verify_message(signed, _dnsfunc(key))] == ["pass"]
    # A replay adds the field on top, where readers look first and where a verifier, taking
    # signed instances from the bottom up, would not notice it unless it was oversigned.
    replayed = f"{name}: added by a replay\r\n".encode() + signed
    assert [r.result for r in verify_message(replayed, _dnsfunc(key))] == ["fail"]


# --- Authentication-Results that say exactly what was found ----------------------------------


def _parse(value: str) -> list[authres.DKIMAuthenticationResult]:
    header = authres.AuthenticationResultsHeader.parse_value(value)
    assert header.authserv_id == "mx.test"
    return list(header.results)


def test_a_sender_chosen_selector_cannot_add_a_result(key: SigningKey) -> None:
    message = _message(b"hi", b"body\r\n")
    headers, body = parse_message(message)
    signature = sign(headers, body, [key])[0].field
    forged = signature.replace(b"s=s1", b"s=x@y dkim=pass header.d=paypal.com", 1)

    def no_key(name: bytes, timeout: float = 5.0) -> bytes:
        raise KeyNotFoundError(f"no key published at {name.decode()}")

    (result,) = verify_message(forged + message, no_key)
    value = results_header("mx.test", [result])
    (parsed,) = _parse(value)
    assert parsed.method == "dkim" and parsed.result == "permerror"
    assert parsed.header_d == "example.com"
    assert parsed.header_s is None  # not a selector: left out
    assert "paypal" not in value.split('"')[0] + value.split('"')[-1]  # only inside the reason


def test_a_reason_with_at_signs_and_semicolons_stays_one_quoted_reason() -> None:
    reason = (
        "DNS failure looking up s1._domainkey.example.com: All nameservers failed to answer "
        "the query s1@example.com. IN TXT; dkim=pass header.d=paypal.com (x"
    )
    value = results_header("mx.test", [DkimResult("temperror", "example.com", "s1", reason=reason)])
    (parsed,) = _parse(value)
    assert (parsed.result, parsed.header_d, parsed.header_s) == ("temperror", "example.com", "s1")
    assert parsed.reason == reason


@given(
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
)
def test_any_tag_values_give_one_result_per_signature(
    selector: str, identity: str, reason: str
) -> None:
    results = [
        DkimResult("fail", "example.com", selector, "rsa-sha256", identity, reason),
        DkimResult("pass", "example.org", "s2", "ed25519-sha256", "@example.org"),
    ]
    parsed = _parse(results_header("mx.test", results))
    assert [(p.result, p.header_d) for p in parsed] == [
        ("fail", "example.com"),
        ("pass", "example.org"),
    ]


def test_many_results_are_folded_between_results() -> None:
    results = [DkimResult("fail", f"d{i}.example", "s1", reason="x" * 150) for i in range(10)]
    value = results_header("mx.test", results)
    lines = ("Authentication-Results: " + value).split("\n")
    assert len(lines) > 1 and all(len(line) <= LINE_LIMIT for line in lines)
    assert [p.header_d for p in _parse(value)] == [f"d{i}.example" for i in range(10)]


@pytest.mark.parametrize(
    "value",
    [
        b"mx.example.org; dkim=pass",
        b"MX.Example.Org; dkim=pass",
        b'"mx.example.org"; dkim=pass header.d=bank.test',
        b"(a (nested) comment) mx.example.org 1; dkim=pass",
        b"(quoted \\) paren) mx.example.org; dkim=pass",
        b"\n\tmx.example.org;\n\tdkim=pass",
    ],
)
def test_results_claiming_our_id_in_any_spelling_are_found(value: bytes) -> None:
    assert header_authserv_id(value) == "mx.example.org"
    assert forged_results([(b"Authentication-Results", value)], "mx.example.org") == [1]


def test_results_of_other_servers_are_kept() -> None:
    headers = [
        (b"Authentication-Results", b"other.example; dkim=pass"),
        (b"Authentication-Results", b"mx.example.org.evil; dkim=pass"),
        (b"Authentication-Results", b"(mx.example.org) other.example; dkim=pass"),
    ]
    assert forged_results(headers, "mx.example.org") == []


def test_dns_failure_text_parses(key: SigningKey) -> None:
    message = _message(b"hi", b"body\r\n")
    headers, body = parse_message(message)
    signed = sign(headers, body, [key])[0].field + message

    def servfail(name: bytes, timeout: float = 5.0) -> bytes:
        raise DnsTemporaryError(
            f"DNS failure looking up {name.decode()}: query s1@example.com answered SERVFAIL"
        )

    (parsed,) = _parse(results_header("mx.test", verify_message(signed, servfail)))
    assert (parsed.result, parsed.header_d) == ("temperror", "example.com")
