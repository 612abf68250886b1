"""The pure steps of `check backend`: lines from bytes, replies from lines, STARTTLS offered.

The captures are byte for byte what the test suite's private Postfix 3.7 and Dovecot 2.3
(Debian 12) answer to the check's commands; every one is fed split at every offset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postwarden.appliance.backend_check import (
    BackendProtocolError,
    LineBuffer,
    Reply,
    Verdict,
    certificate_verdict,
    dialect,
    imap_capabilities,
    imap_greeting,
    imap_offers_starttls,
    imap_tagged,
    pop3_multiline,
    pop3_offers_stls,
    pop3_status,
    smtp_offers_starttls,
    smtp_reply,
)

POSTFIX_GREETING = b"220 mx.example.test ESMTP\r\n"
POSTFIX_EHLO = (
    b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-ETRN\r\n"
    b"250-STARTTLS\r\n"
    b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 CHUNKING\r\n"
)
DOVECOT_IMAP_GREETING = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS "
    b"AUTH=PLAIN AUTH=LOGIN] Dovecot (Debian) ready.\r\n"
)
DOVECOT_CAPABILITY = (
    b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS "
    b"AUTH=PLAIN AUTH=LOGIN\r\n"
    b"c1 OK Pre-login capabilities listed, post-login capabilities have more.\r\n"
)
DOVECOT_POP3_GREETING = b"+OK Dovecot (Debian) ready.\r\n"
DOVECOT_CAPA = (
    b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\n"
    b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n"
)

Parse = Callable[[Sequence[str]], Reply | None]


def feed_split(data: bytes, at: int, parse: Parse) -> Reply:
    """Feed `data` in two pieces split at `at`; the reply must be complete only at the end."""
    buffer = LineBuffer()
    lines = buffer.feed(data[:at])
    if at < len(data):
        assert parse(lines) is None, (at, lines)
    lines += buffer.feed(data[at:])
    reply = parse(lines)
    assert reply is not None
    assert buffer.pending == b""
    return reply


CAPTURES: list[tuple[str, bytes, Parse, bool]] = [
    ("postfix greeting", POSTFIX_GREETING, lambda ls: smtp_reply(ls, 220), True),
    ("postfix ehlo", POSTFIX_EHLO, lambda ls: smtp_reply(ls, 250), True),
    ("dovecot imap greeting", DOVECOT_IMAP_GREETING, imap_greeting, True),
    ("dovecot capability", DOVECOT_CAPABILITY, lambda ls: imap_tagged(ls, "c1"), True),
    ("dovecot pop3 greeting", DOVECOT_POP3_GREETING, pop3_status, True),
    ("dovecot capa", DOVECOT_CAPA, pop3_multiline, True),
]


@pytest.mark.parametrize(("name", "data", "parse", "ok"), CAPTURES, ids=[c[0] for c in CAPTURES])
def test_captured_replies_read_the_same_split_at_every_offset(
    name: str, data: bytes, parse: Parse, ok: bool
) -> None:
    whole = feed_split(data, len(data), parse)
    assert whole.ok is ok
    assert len(whole.lines) == data.count(b"\n")
    for at in range(len(data)):
        assert feed_split(data, at, parse) == whole


def test_postfix_ehlo_offers_starttls_and_dovecot_too() -> None:
    assert smtp_offers_starttls(feed_split(POSTFIX_EHLO, 0, lambda ls: smtp_reply(ls, 250)))
    assert imap_offers_starttls(feed_split(DOVECOT_CAPABILITY, 0, lambda ls: imap_tagged(ls, "c1")))
    assert pop3_offers_stls(feed_split(DOVECOT_CAPA, 0, pop3_multiline))


def test_starttls_is_a_keyword_not_a_substring_nor_the_server_name() -> None:
    ehlo = smtp_reply(["250-starttls", "250-XSTARTTLS", "250 STARTTLSX"], 250)
    assert ehlo is not None and not smtp_offers_starttls(ehlo)
    capa = pop3_multiline(["+OK STLS follows", "USER", "STLSX", "."])
    assert capa is not None and not pop3_offers_stls(capa)
    lowercase = smtp_reply(["250-mx", "250 starttls"], 250)
    assert lowercase is not None and smtp_offers_starttls(lowercase)


def test_imap_capabilities_come_from_untagged_lines_and_response_codes() -> None:
    reply = imap_tagged(["* capability IMAP4rev1 starttls", "c1 OK [CAPABILITY IDLE] done"], "c1")
    assert reply is not None
    assert imap_capabilities(reply) == {"IMAP4REV1", "STARTTLS", "IDLE"}
    without = imap_tagged(["* CAPABILITY IMAP4rev1 LOGINDISABLED", "c1 OK done"], "c1")
    assert without is not None and not imap_offers_starttls(without)


def test_refusals_are_complete_replies_that_are_not_ok() -> None:
    assert smtp_reply(["454 4.7.0 TLS not available due to local problem"], 220) == Reply(
        False,
        ("454 4.7.0 TLS not available due to local problem",),
        "454 4.7.0 TLS not available due to local problem",
    )
    refused = imap_tagged(["c2 NO [UNAVAILABLE] TLS not available"], "c2")
    assert refused is not None and not refused.ok
    assert refused.summary == "c2 NO [UNAVAILABLE] TLS not available"
    assert pop3_multiline(["-ERR unknown command"]) == Reply(
        False, ("-ERR unknown command",), "-ERR unknown command"
    )
    bye = imap_greeting(["* BYE too many connections"])
    assert bye is not None and not bye.ok
    assert smtp_reply(["554 5.7.1 no service"], 220) == Reply(
        False, ("554 5.7.1 no service",), "554 5.7.1 no service"
    )


def test_an_imap_answer_to_a_tag_never_sent_is_a_protocol_error() -> None:
    assert imap_tagged(["* CAPABILITY IMAP4rev1"], "c1") is None
    with pytest.raises(BackendProtocolError):
        imap_tagged(["* CAPABILITY IMAP4rev1", "c0 OK old"], "c1")


@pytest.mark.parametrize(
    ("parse", "line"),
    [
        (lambda ls: smtp_reply(ls, 220), "HTTP/1.1 400 Bad Request"),
        (imap_greeting, "+OK POP3 here"),
        (lambda ls: imap_tagged(ls, "c1"), "garbage"),
        (pop3_status, "* OK IMAP here"),
    ],
)
def test_another_protocol_is_a_protocol_error(parse: Parse, line: str) -> None:
    with pytest.raises(BackendProtocolError):
        parse([line])


def test_an_endless_line_is_a_protocol_error() -> None:
    buffer = LineBuffer()
    with pytest.raises(BackendProtocolError, match="longer than"):
        for _ in range(100):
            buffer.feed(b"x" * 1000)


def test_no_step_sends_a_login_command() -> None:
    for service in ("smtp", "imap", "pop3"):
        steps = dialect(service, "gw.example.test")
        sent = [
            steps.capabilities_command,
            steps.starttls_command,
            steps.tls_capabilities_command,
            steps.quit_command,
        ]
        verbs = {c.split()[1] if service == "imap" else c.split()[0] for c in sent}
        assert not verbs & {"AUTH", "AUTHENTICATE", "LOGIN", "USER", "PASS", "APOP"}, verbs


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (20, Verdict.UNTRUSTED),
        (19, Verdict.UNTRUSTED),
        (18, Verdict.UNTRUSTED),
        (62, Verdict.WRONG_NAME),
        (64, Verdict.WRONG_NAME),
        (10, Verdict.EXPIRED),
        (9, Verdict.NOT_YET_VALID),
        (23, Verdict.CERTIFICATE_REJECTED),  # CERT_REVOKED: not one we name
    ],
)
def test_openssl_verify_codes_become_verdicts(code: int, verdict: Verdict) -> None:
    assert certificate_verdict(code) is verdict


PARSERS: list[Parse] = [
    lambda ls: smtp_reply(ls, 220),
    imap_greeting,
    lambda ls: imap_tagged(ls, "c1"),
    pop3_status,
    pop3_multiline,
]


@given(st.lists(st.binary(max_size=300), max_size=8))
def test_any_bytes_give_a_reply_none_or_a_protocol_error(chunks: list[bytes]) -> None:
    for parse in PARSERS:
        buffer = LineBuffer()
        lines: list[str] = []
        try:
            for chunk in chunks:
                lines += buffer.feed(chunk)
                parse(lines)
        except BackendProtocolError:
            continue


def test_control_characters_from_the_backend_are_escaped() -> None:
    # An escape sequence in a greeting must not reach the operator's terminal as one.
    (line,) = LineBuffer().feed(b"220 mx \x1b]0;owned\x07 ESMTP \xc2\x9b2J\r\n")
    assert line == "220 mx \\x1b]0;owned\\x07 ESMTP \\x9b2J"
    reply = smtp_reply([line], 220)
    assert reply is not None and reply.ok
