"""Fuzzing milterd's message handling: any header list and body, signing and verifying.

Whatever the client sent (non-ASCII, bare CR or LF, huge lines, duplicate or missing From),
`MessageHandler.process()` returns `Changes` or raises `MessageFault` (answered per
`milterd.on_error`), and the changes can be applied as they are: header names are field
names, values carry no line break but Postfix's LF folds, and nothing untrusted adds a line
to the SMTP reply or the log.
"""

from __future__ import annotations

import logging
import re
import socket
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from milterd.message_handler import Changes, Envelope, MessageFault, MessageHandler
from milterd.milter import ACCEPT, BODY_CHUNK, CONTINUE, REJECT, TEMPFAIL, DkimMilter
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
    # Any field name Postfix could hand over: printable ASCII but ":".
    st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
        min_size=1,
        max_size=20,
    ).map(str.encode),
)
# Names Postfix never would hand over (blanks, controls, 8-bit, empty): a MessageFault.
# Kept to one field in some messages, so that most messages reach the signer or verifier.
MALFORMED_NAME = st.one_of(
    st.binary(max_size=20),
    # What a fold looks like: a real name after a blank.
    st.builds(lambda blank, name: blank + name, st.sampled_from([b" ", b"\t", b"\r\n "]), NAME),
)
HEADER = st.one_of(st.tuples(st.just(b"From"), ADDRESS), st.tuples(NAME, TEXT_BYTES))
# Mostly one From (so most messages get signed or verified), sometimes none or several.
WELL_FORMED_HEADERS = st.one_of(
    st.builds(
        lambda first, rest, position: [*rest[:position], first, *rest[position:]],
        st.tuples(st.just(b"From"), ADDRESS),
        st.lists(st.tuples(NAME.filter(lambda n: n.lower() != b"from"), TEXT_BYTES), max_size=10),
        st.integers(min_value=0, max_value=10),
    ),
    st.lists(HEADER, max_size=12),
)
HEADERS = st.builds(
    lambda headers, bad, position: [*headers[:position], *bad, *headers[position:]],
    WELL_FORMED_HEADERS,
    # One message in four or so gets one field with a malformed name, often the first
    # (where dkimpy's parser has no field to fold it into).
    st.sampled_from([0, 0, 0, 1]).flatmap(
        lambda n: st.lists(st.tuples(MALFORMED_NAME, TEXT_BYTES), min_size=n, max_size=n)
    ),
    st.sampled_from([0, 0, 1, 3, 12]),
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


class _RecordingMilter(DkimMilter):
    """milterd's pymilter adapter without libmilter: what it asks the MTA to do, recorded."""

    def __init__(self, handler: MessageHandler) -> None:
        super().__init__()
        self.handler = handler
        self._protocol = 0  # nothing negotiated: every callback answers
        self.macros: dict[str, str] = {}
        self.replies: list[tuple[str, str, str]] = []

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setreply(self, code: str, xcode: str, text: str) -> None:
        self.replies.append((code, xcode, text))

    def chgheader(self, name: str, index: int, value: str) -> None:
        assert FIELD_NAME.fullmatch(name.encode()) and index >= 1, (name, index)
        assert value == "" or FOLDED_VALUE.fullmatch(value), value

    def addheader(self, name: str, value: str, index: int = -1) -> None:
        assert FIELD_NAME.fullmatch(name.encode()) and index == 0, (name, index)
        assert FOLDED_VALUE.fullmatch(value), value

    def replacebody(self, chunk: bytes) -> None:
        assert 0 < len(chunk) <= BODY_CHUNK


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


CLIENTS = st.sampled_from(["127.0.0.1", "203.0.113.9", "2001:db8::9", None])
LOGINS = st.none() | st.sampled_from(["alice", "alice@example.com", "mallory@example.net"])
SENDERS = st.sampled_from(["<alice@example.com>", "<>", "<x@example.net>", " <a\r\nb> "])


class MilterConnection(RuleBasedStateMachine):
    """One SMTP connection as libmilter drives the adapter: messages, aborts, a close.

    Every message that reaches its end is answered exactly once (accept, reject with 550 or
    tempfail with 451) with exactly one log line from the adapter and never an internal
    error; the busy count (what a graceful stop waits for) is back where it was after each
    message, abort and close.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lines = _Lines()
        self.logger = logging.getLogger("postwarden.milterd")
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)  # the per-message line is INFO
        self.logger.addHandler(self.lines)
        self.busy_before = DkimMilter.busy.value
        self.in_message = False

    def teardown(self) -> None:
        self.logger.removeHandler(self.lines)
        self.logger.setLevel(self.level)

    @initialize(handler=HANDLERS, client=CLIENTS)
    def start(self, handler: MessageHandler, client: str | None) -> None:
        self.handler = handler
        self._connect(client)

    def _connect(self, client: str | None) -> None:
        """A new SMTP connection: libmilter makes a new adapter instance for it."""
        self.milter = _RecordingMilter(self.handler)
        if client is None:  # the sendmail command: no client address
            assert self.milter.connect("localhost", socket.AF_UNIX, None) == CONTINUE
        else:
            family = socket.AF_INET6 if ":" in client else socket.AF_INET
            assert self.milter.connect("client.example", family, (client, 25)) == CONTINUE

    @precondition(lambda self: not self.in_message)
    @rule(login=LOGINS, sender=SENDERS, headers=HEADERS, body=BODY)
    def transaction(
        self, login: str | None, sender: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """MAIL FROM, the message, its end: what most connections carry."""
        self.mail_from(login, sender)
        self.whole_message(headers, body)
        self.end_of_message()

    @precondition(lambda self: not self.in_message)
    @rule(login=LOGINS, sender=SENDERS)
    def mail_from(self, login: str | None, sender: str) -> None:
        self.milter.macros = {"{auth_authen}": login} if login else {}
        assert self.milter.envfrom(sender) == CONTINUE
        self.in_message = True

    @precondition(lambda self: self.in_message)
    @rule(
        header=st.one_of(HEADER, st.tuples(MALFORMED_NAME, TEXT_BYTES)),
    )
    def header(self, header: tuple[bytes, bytes]) -> None:
        name, value = header
        # libmilter hands the name over as text (pymilter decodes it with surrogateescape).
        assert self.milter.header(name.decode("utf-8", "surrogateescape"), value) == CONTINUE

    @precondition(lambda self: self.in_message)
    @rule(headers=HEADERS, body=BODY)
    def whole_message(self, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A message's header block and body, as Postfix sends it after MAIL FROM."""
        for header in headers:
            self.header(header)
        self.body(body)

    @precondition(lambda self: self.in_message)
    @rule(chunk=BODY)
    def body(self, chunk: bytes) -> None:
        assert self.milter.body(chunk) == CONTINUE

    @precondition(lambda self: self.in_message)
    @rule()
    def end_of_message(self) -> None:
        self.milter.macros["i"] = "4QID"
        replies, lines = len(self.milter.replies), len(self.lines.records)
        answer = self.milter.eom()
        self.in_message = False
        new_replies = self.milter.replies[replies:]
        adapter_lines = [r for r in self.lines.records[lines:] if r.module == "milter"]
        assert len(adapter_lines) == 1, [r.getMessage() for r in adapter_lines]
        (line,) = adapter_lines
        text = line.getMessage()
        assert "\n" not in text and "\r" not in text and "internal error" not in text, text
        if answer == ACCEPT:
            assert new_replies == []
        elif answer == REJECT:
            ((code, xcode, reply),) = new_replies
            assert (code, xcode) == ("550", "5.7.1") and reply.isascii() and reply.isprintable()
        else:
            assert answer == TEMPFAIL and [r[0] for r in new_replies] == ["451"], answer
        assert self.milter.headers == [] and self.milter.body_parts == []

    @precondition(lambda self: self.in_message)
    @rule()
    def abort(self) -> None:
        assert self.milter.abort() == CONTINUE
        self.in_message = False

    @rule(client=CLIENTS)
    def close_and_reconnect(self, client: str | None) -> None:
        """The client goes away (mid-message or not); another one connects."""
        assert self.milter.close() == CONTINUE
        self.in_message = False
        self._connect(client)

    @invariant()
    def busy_counts_open_messages(self) -> None:
        assert DkimMilter.busy.value == self.busy_before + self.in_message


TestMilterConnection = MilterConnection.TestCase
TestMilterConnection.settings = settings(
    max_examples=60,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
