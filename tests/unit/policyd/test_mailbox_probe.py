"""The LMTP reply codec, what an RCPT reply says about a mailbox, and which keys are probed."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.mailbox_probe import (
    MAX_ADDRESS_BYTES,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    LmtpProtocolError,
    LmtpReply,
    MailboxStatus,
    ReplyDecoder,
    UnsafeAddress,
    encode_probe,
    probe_address,
    rcpt_status,
)

# Dovecot 2.3.19's side of a real LMTP session: greeting, LHLO, then two probes
# (MAIL FROM:<>, RCPT TO:<alice@example.test>, RSET; the same for nobody@example.test).
CAPTURE = (
    b"220 vm Dovecot (Debian) ready.\r\n"
    b"250-vm\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n"
    b"250-PIPELINING\r\n250 STARTTLS\r\n"
    b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.0.0 OK\r\n"
    b"250 2.1.0 OK\r\n"
    b"550 5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test\r\n"
    b"250 2.0.0 OK\r\n"
)
EXPECTED = [
    LmtpReply(220, ("vm Dovecot (Debian) ready.",)),
    LmtpReply(250, ("vm", "8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES", "PIPELINING", "STARTTLS")),
    LmtpReply(250, ("2.1.0 OK",), (2, 1, 0)),
    LmtpReply(250, ("2.1.5 OK",), (2, 1, 5)),
    LmtpReply(250, ("2.0.0 OK",), (2, 0, 0)),
    LmtpReply(250, ("2.1.0 OK",), (2, 1, 0)),
    LmtpReply(
        550,
        ("5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test",),
        (5, 1, 1),
    ),
    LmtpReply(250, ("2.0.0 OK",), (2, 0, 0)),
]


def test_decodes_a_real_dovecot_session() -> None:
    decoder = ReplyDecoder()
    assert decoder.feed(CAPTURE) == EXPECTED
    assert decoder.pending == 0


@pytest.mark.parametrize("offset", range(len(CAPTURE) + 1))
def test_split_at_every_offset_gives_the_same_replies(offset: int) -> None:
    decoder = ReplyDecoder()
    got = decoder.feed(CAPTURE[:offset]) + decoder.feed(CAPTURE[offset:])
    assert got == EXPECTED
    assert decoder.pending == 0


def test_byte_by_byte() -> None:
    decoder = ReplyDecoder()
    got = [r for i in range(len(CAPTURE)) for r in decoder.feed(CAPTURE[i : i + 1])]
    assert got == EXPECTED


def test_partial_multi_line_reply_waits_for_its_last_line() -> None:
    decoder = ReplyDecoder()
    assert decoder.feed(b"250-vm\r\n250-PIPELINING\r\n") == []
    assert decoder.pending > 0
    assert decoder.feed(b"250 STARTTLS\r\n") == [LmtpReply(250, ("vm", "PIPELINING", "STARTTLS"))]


def test_bare_lf_and_code_only_lines_are_replies() -> None:
    assert ReplyDecoder().feed(b"250\n451 4.3.0 busy\n") == [
        LmtpReply(250, ("",)),
        LmtpReply(451, ("4.3.0 busy",), (4, 3, 0)),
    ]


def test_enhanced_code_of_another_class_is_ignored() -> None:
    (reply,) = ReplyDecoder().feed(b"250 5.1.1 odd\r\n")
    assert reply.enhanced is None


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",
        b"25 short\r\n",
        b"2500 no separator\r\n",
        b"250x OK\r\n",
        b"150 1xx is not LMTP\r\n",
        b"650 nor 6xx\r\n",
        b"\r\n",
        b"250-first\r\n550 other code\r\n",
        b" 250 leading space\r\n",
        b"250" + b"x" * MAX_REPLY_LINE,
        b"".join(b"250-line\r\n" for _ in range(MAX_REPLY_LINES + 1)),
    ],
)
def test_garbage_is_a_protocol_error_and_stays_one(data: bytes) -> None:
    decoder = ReplyDecoder()
    with pytest.raises(LmtpProtocolError):
        decoder.feed(data)
    with pytest.raises(LmtpProtocolError):
        decoder.feed(b"250 OK\r\n")


def test_long_line_refused_before_it_is_buffered() -> None:
    decoder = ReplyDecoder()
    decoder.feed(b"250 " + b"x" * (MAX_REPLY_LINE - 4))
    with pytest.raises(LmtpProtocolError):
        decoder.feed(b"x" * 2)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_replies_or_a_protocol_error(data: bytes) -> None:
    with contextlib.suppress(LmtpProtocolError):
        for reply in ReplyDecoder().feed(data):
            assert 200 <= reply.code <= 599 and reply.lines


_LINE_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@given(st.lists(st.tuples(st.integers(200, 599), st.lists(_LINE_TEXT, min_size=1, max_size=4))))
def test_any_replies_roundtrip(replies: list[tuple[int, list[str]]]) -> None:
    wire = b"".join(
        b"".join(
            b"%d%s%s\r\n" % (code, b" " if i == len(lines) - 1 else b"-", text.encode())
            for i, text in enumerate(lines)
        )
        for code, lines in replies
    )
    got = ReplyDecoder().feed(wire)
    assert [(r.code, list(r.lines)) for r in got] == replies


# --- what RCPT's reply says -----------------------------------------------------------------


EXISTS, NO_USER = MailboxStatus.EXISTS, MailboxStatus.NO_SUCH_USER


def _reply(line: bytes) -> LmtpReply:
    (reply,) = ReplyDecoder().feed(line + b"\r\n")
    return reply


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"250 2.1.5 OK", MailboxStatus.EXISTS),
        (b"250 OK", MailboxStatus.EXISTS),
        (b"251 2.1.5 will forward", MailboxStatus.EXISTS),
        # Over quota: the mailbox is there (lmtp_rcpt_check_quota = yes), quota is not ours.
        (b"552 5.2.2 <a@example.test> Quota exceeded (mailbox for user is full)", EXISTS),
        (b"452 4.2.2 <a@example.test> Quota exceeded (mailbox for user is full)", EXISTS),
        (b"550 5.1.1 <a@example.test> User doesn't exist: a@example.test", NO_USER),
        (b"550 5.1.0 address rejected", MailboxStatus.NO_SUCH_USER),
        (b"550 5.2.1 mailbox disabled", MailboxStatus.NO_SUCH_USER),
        (b"553 5.1.3 bad address syntax", MailboxStatus.NO_SUCH_USER),
        (b"550 no such user", MailboxStatus.NO_SUCH_USER),
        (b"451 4.3.0 <a@example.test> Temporary internal error", MailboxStatus.TEMPORARY),
        (b"421 4.3.2 shutting down", MailboxStatus.TEMPORARY),
        # Syntax and system errors are ours or Dovecot's, never a reason to refuse mail.
        (b"501 5.5.4 Invalid TO: Missing '>' at end of path", MailboxStatus.TEMPORARY),
        (b"503 5.5.0 MAIL needed first", MailboxStatus.TEMPORARY),
        (b"554 5.3.0 system error", MailboxStatus.TEMPORARY),
        (b"220 greeting where a reply belongs", MailboxStatus.TEMPORARY),
        (b"354 go ahead", MailboxStatus.TEMPORARY),
    ],
)
def test_rcpt_reply_decides_the_mailbox_status(line: bytes, status: MailboxStatus) -> None:
    assert rcpt_status(_reply(line)).status is status


def test_temporary_results_carry_a_bounded_kind_and_the_reply() -> None:
    result = rcpt_status(_reply(b"451 4.3.0 <a@example.test> Temporary internal error"))
    assert result.kind == "4xx to RCPT"
    assert "451 4.3.0" in result.detail


# --- which keys are ever written to Dovecot ------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["alice@example.test", "j.smith+tag@mail.example.test", "o'neil@x-y.example", "a@b"],
)
def test_plain_addresses_are_probed(key: str) -> None:
    assert probe_address(key) == key
    assert encode_probe(key) == b"MAIL FROM:<>\r\nRCPT TO:<%s>\r\nRSET\r\n" % key.encode()


HOSTILE_KEYS = [
    "alice@example.test\r\nRSET",
    "alice@example.test\nQUIT",
    "alice@example.test\r",
    "alice@example.test>\r\nRCPT TO:<bob@example.test",
    "al\x00ice@example.test",
    "a b@example.test",
    "alice@example.test ",
    "<alice@example.test>",
    "alice@example.test>",
    '"alice"@example.test',
    "al\\ice@example.test",
    "alice@@example.test",
    "a@b@example.test",
    "@example.test",
    "alice@",
    "alice",
    "",
    ".alice@example.test",
    "al..ice@example.test",
    "alice@example..test",
    "alice@-example.test",
    "alice@[127.0.0.1]",
    "\u00e4lice@example.test",
    "alice@ex\u00e4mple.test",
    "a" * 65 + "@example.test",
    "a@" + "b" * (MAX_ADDRESS_BYTES - 1),
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_keys_are_never_encoded(key: str) -> None:
    assert probe_address(key) is None
    with pytest.raises(UnsafeAddress):
        encode_probe(key)


@given(st.text(max_size=80))
def test_an_encoded_probe_is_always_three_commands(key: str) -> None:
    try:
        wire = encode_probe(key)
    except UnsafeAddress:
        return
    assert wire.count(b"\r\n") == 3
    assert wire.count(b"\n") == 3
    assert b"\x00" not in wire and b" " not in wire.split(b"\r\n")[1][len(b"RCPT TO:") :]
