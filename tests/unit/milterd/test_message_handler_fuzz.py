"""Fuzzing milterd's message handling: any header list and body, signing and verifying.

Whatever the client sent (non-ASCII, bare CR or LF, huge lines, duplicate or missing From),
`MessageHandler.process()` returns `Changes` or raises `MessageFault` (answered per
`milterd.on_error`), and the changes can be applied as they are: header names are field
names, values carry no line break but Postfix's LF folds, and nothing untrusted adds a line
to the SMTP reply or the log.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milterd.message_handler import Changes, Envelope, MessageFault, MessageHandler
from postwarden.config.model import Config
from postwarden.dkim.keys import SigningKey, generate_key
from postwarden.dkim.verification import DnsTemporaryError, KeyNotFoundError

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# RFC 5322 field name: printable ASCII except ":".
FIELD_NAME = re.compile(rb"[!-9;-~]+")
# A header value as the milter API takes it: ASCII, folded only as LF + whitespace.
FOLDED_VALUE = re.compile(r"[^\r\n]*(\n[ \t][^\r\n]*)*", re.ASCII)


@cache
def _keys() -> tuple[SigningKey, ...]:
    rsa = SigningKey("example.com", "s1", "rsa-sha256", Path("/k"), generate_key("rsa-sha256"))
    ed = SigningKey(
        "example.com", "e1", "ed25519-sha256", Path("/e"), generate_key("ed25519-sha256")
    )
    return rsa, ed


def _dnsfunc(name: bytes, timeout: float = 5.0) -> bytes:
    zone = {f"{k.record_name}.".encode(): k.txt_record().encode() for k in _keys()}
    if name in zone:
        return zone[name]
    if name.startswith(b"slow"):
        raise DnsTemporaryError(name.decode("ascii", "replace"))
    raise KeyNotFoundError(name.decode("ascii", "replace"))


@cache
def _handler(on_error: str, from_mismatch: str) -> MessageHandler:
    config = Config.model_validate(
        {
            "mail": {"hostname": "mx.example.org"},
            "milterd": {"on_error": on_error, "from_mismatch": from_mismatch},
        }
    )
    return MessageHandler(config, dnsfunc=_dnsfunc, keys=list(_keys()))


HANDLERS = st.builds(
    _handler, st.sampled_from(["accept", "tempfail"]), st.sampled_from(["reject", "unsigned"])
)
ENVELOPES = st.one_of(
    st.just(Envelope("127.0.0.1")),  # trusted: signed
    st.just(Envelope(None)),  # local injection: signed
    st.builds(
        Envelope,
        st.just("203.0.113.9"),
        st.sampled_from(["alice", "bob@example.com"]),
        mail_from=st.none() | st.sampled_from(["alice@example.com", "x@example.net"]),
    ),  # submission: From checked against the login
    st.just(Envelope("203.0.113.9")),  # inbound: verified
)
ADDRESS = st.sampled_from(
    [
        b"Alice <alice@example.com>",
        b"alice@example.com",
        b"bob@sub.example.com",
        b"x@example.net",
        b"<>",
        b'"quoted, name" <alice@example.com>, other@example.com',
        b"=?utf-8?q?=C3=A9?= <\xc3\xa9@example.com>",
        b"alice@example.com\r\nBcc: victim@example.net",
        b"undisclosed-recipients:;",
    ]
)
TEXT_BYTES = st.one_of(
    st.binary(max_size=120),
    st.lists(
        st.sampled_from([b"a", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\xff", b"\xc3\xa9"]),
        max_size=40,
    ).map(b"".join),
    st.integers(min_value=990, max_value=5000).map(lambda n: b"x" * n),  # huge line
)
NAME = st.one_of(
    st.sampled_from(
        [
            b"From",
            b"from",
            b"To",
            b"Subject",
            b"Date",
            b"Message-ID",
            b"DKIM-Signature",
            b"Authentication-Results",
            b"Received",
            b"Reply-To",
            b"Sender",
        ]
    ),
    # Any field name Postfix could hand over (printable ASCII but ":")...
    st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
        min_size=1,
        max_size=20,
    ).map(str.encode),
    # ...and names it never would (blanks, controls, 8-bit, empty): these are MessageFaults.
    st.binary(max_size=20),
)
HEADER = st.one_of(st.tuples(st.just(b"From"), ADDRESS), st.tuples(NAME, TEXT_BYTES))
# Mostly one From (so most messages get signed or verified), sometimes none or several.
HEADERS = st.one_of(
    st.builds(
        lambda first, rest, position: [*rest[:position], first, *rest[position:]],
        st.tuples(st.just(b"From"), ADDRESS),
        st.lists(st.tuples(NAME.filter(lambda n: n.lower() != b"from"), TEXT_BYTES), max_size=10),
        st.integers(min_value=0, max_value=10),
    ),
    st.lists(HEADER, max_size=12),
)
BODY = st.one_of(
    st.binary(max_size=400),
    st.lists(TEXT_BYTES, max_size=6).map(b"\r\n".join),
    st.integers(min_value=999, max_value=20000).map(lambda n: b"y" * n + b"\r\n"),
)


def _assert_applicable(changes: Changes) -> None:
    for name, value in changes.add:
        assert FIELD_NAME.fullmatch(name.encode()), name
        assert FOLDED_VALUE.fullmatch(value), value
        assert not value.startswith((" ", "\t"))  # Postfix writes "Name: " itself
    for name, index, value in changes.refold:
        assert FIELD_NAME.fullmatch(name.encode()) and index >= 1, name
        assert FOLDED_VALUE.fullmatch(value), value
    assert all(i >= 1 for i in changes.remove_results)
    if changes.reject is not None:
        # Goes after "550 5.7.1 ": one printable line.
        assert changes.reject.isascii() and changes.reject.isprintable()
    assert "\n" not in changes.summary and "\r" not in changes.summary  # one log line


def _process(
    handler: MessageHandler, envelope: Envelope, headers: list[tuple[bytes, bytes]], body: bytes
) -> Changes | None:
    try:
        changes = handler.process(envelope, headers, body)
    except MessageFault as fault:
        assert "\n" not in str(fault) and "\r" not in str(fault)  # logged as one line
        return None
    _assert_applicable(changes)
    return changes


@FUZZ
@given(handler=HANDLERS, envelope=ENVELOPES, headers=HEADERS, body=BODY)
def test_any_message_gives_applicable_changes_or_a_fault(
    handler: MessageHandler,
    envelope: Envelope,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    _process(handler, envelope, headers, body)


@FUZZ
@given(
    handler=HANDLERS,
    headers=HEADERS,
    body=BODY,
    tamper=st.lists(st.tuples(st.integers(min_value=0), HEADER), max_size=3),
    selector=st.sampled_from([b"s1", b"e1", b"slow", b"gone", b"s1\r\n", b"\xff"]),
)
def test_signed_then_tampered_messages_verify_without_surprises(
    handler: MessageHandler,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    tamper: list[tuple[int, tuple[bytes, bytes]]],
    selector: bytes,
) -> None:
    """Signatures we made, then altered in transit: the verifier's hardest inputs."""
    base = [(b"From", b"alice@example.com"), *headers]
    signed = _process(handler, Envelope("127.0.0.1"), base, body)
    signatures = [(n.encode(), v.encode()) for n, v in signed.add] if signed else []
    received = [*signatures, *base]
    for position, header in tamper:
        received.insert(position % (len(received) + 1), header)
    if signatures:
        # A selector that does not resolve, resolves slowly or is not a DNS name.
        received.append((b"DKIM-Signature", signatures[0][1].replace(b"s=s1", b"s=" + selector)))
    _process(handler, Envelope("203.0.113.9"), received, body)


@pytest.mark.parametrize("first", [b" X-First", b"\tX-First"])
def test_a_first_field_name_starting_with_whitespace_is_a_fault_not_a_crash(
    first: bytes,
) -> None:
    """Found by this file: dkimpy's parser took the first line for a fold of no field and
    raised IndexError out of process(), documented to raise only MessageFault."""
    headers = [(first, b"v"), (b"From", b"alice@example.com")]
    for envelope in (Envelope("203.0.113.9"), Envelope("127.0.0.1")):
        with pytest.raises(MessageFault, match="malformed header field name"):
            _handler("accept", "reject").process(envelope, headers, b"")
