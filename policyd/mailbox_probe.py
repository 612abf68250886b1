"""Does a mailbox exist? Asked live of Dovecot over LMTP: one RCPT probe, no cache.

Dovecot is the authority on its users and nothing here caches an answer: a deleted mailbox
is refused as soon as Dovecot sees the change (its passwd-file is re-read on the first
lookup in each new second of Dovecot's clock, so within a second).

A probe, on a pooled connection that has already said LHLO, is one pipelined write and one
round trip:

    MAIL FROM:<>  ->  250 2.1.0 OK
    RCPT TO:<a@b> ->  250 2.1.5 OK | 550 5.1.1 <a@b> User doesn't exist: a@b
    RSET          ->  250 2.0.0 OK            (the connection is ready for the next probe)

No message is ever sent (there is no DATA), so a probe cannot deliver anything.

`ReplyDecoder` is the sans-IO part (`feed(bytes) -> list[LmtpReply]`, leftover bytes kept,
one `LmtpProtocolError` for anything that is not an SMTP reply); `rcpt_status()` turns the
RCPT reply into a `MailboxStatus`; `MailboxProber` is the asyncio client.

| RCPT reply / event                            | status       |
| --------------------------------------------- | ------------ |
| 250, 251                                      | EXISTS       |
| 452 4.2.2 / 552 5.2.2 (over quota)            | EXISTS       |
| other 5xx with 5.1.x / 5.2.x (550 5.1.1 …)    | NO_SUCH_USER |
| 550 / 551 / 553 without an enhanced code      | NO_SUCH_USER |
| other 5xx (5.5.x syntax, 5.3.x system, …)     | TEMPORARY    |
| 4xx                                           | TEMPORARY    |
| any other code; timeout, refused, garbage     | TEMPORARY    |

A 5xx that is not about the mailbox (a syntax or system error) is our fault or Dovecot's,
not the sender's: TEMPORARY, so Postfix answers 4xx and the mail waits.
Over quota counts as EXISTS because the question is whether the mailbox exists: answering
"no such user" would tell the sender a lie and make Postfix reply 550 5.1.1. With Dovecot's
default `lmtp_rcpt_check_quota = no` RCPT never reports quota anyway.

Only addresses that `probe_address()` accepts (printable dot-atom ASCII, one @, at most
MAX_ADDRESS_BYTES) are ever written to the LMTP stream, so no key can inject a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from postwarden.config.types import ListenAddress
from postwarden.syntax.domain_names import DomainNameError, parse_domain_name

# RFC 5321: 64 octets of local part, 255 of domain. Longer keys are not addresses.
MAX_ADDRESS_BYTES = 320
# RFC 5321 allows 512 octets per reply line; Dovecot stays far below. Longer is garbage.
MAX_REPLY_LINE = 2048
# LHLO's reply is the longest Dovecot sends (6 lines); a reply that goes on is not LMTP.
MAX_REPLY_LINES = 64
# A whole probe (connect + LHLO on a new connection, then one round trip) must end in this
# time, or it is TEMPORARY; below policyd's socketmap LOOKUP_TIMEOUT (5 s) so the reply
# says why.
PROBE_TIMEOUT = 3.0
# Probes run at the same time per process (one pooled connection each). Every connection
# holds one Dovecot lmtp process (client_limit = 1), which Postfix also needs to deliver.
MAX_CONNECTIONS = 4
# A pooled connection idle for longer is closed, not reused: Dovecot drops idle LMTP
# clients after 5 minutes, and an old connection is the likeliest to be half-closed.
MAX_IDLE_SECONDS = 60.0
# The name we greet Dovecot with (it only logs it).
LHLO_NAME = "postwarden"

_CODE = re.compile(rb"[2-5][0-9][0-9]")
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")
# RFC 5322 atext plus "." for the local part; the domain under the one domain-name rule.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")


class LmtpProtocolError(Exception):
    """Bytes from the LMTP server that are not SMTP replies; the connection is dropped."""


class UnsafeAddress(ValueError):
    """An address that must not be written to the LMTP stream (see probe_address)."""


def probe_address(key: str) -> str | None:
    """The address to probe for `key`, or None when it is not a plain `local@domain`.

    Refused without a probe: CR, LF, NUL, spaces, "<", ">", quotes and anything else outside
    dot-atom ASCII, a missing or second "@", an empty side (`@domain`, `user@`) and keys over
    MAX_ADDRESS_BYTES. Such a key cannot be a mailbox Dovecot would accept on RCPT, so it is
    answered "not found" instead of being sent.
    """
    if len(key) > MAX_ADDRESS_BYTES or not key.isascii():
        return None
    local, at, domain = key.rpartition("@")
    if not at or len(local) > 64 or len(domain) > 255:
        return None
    if _LOCAL_PART.fullmatch(local) is None or not _is_exact_domain(domain):
        return None
    return key


def _is_exact_domain(domain: str) -> bool:
    """The one domain-name rule, with nothing forgiven: parse_domain_name strips blanks
    and a trailing dot, which must not be written to the LMTP stream."""
    try:
        return parse_domain_name(domain) == domain.lower()
    except DomainNameError:
        return False


def encode_probe(address: str) -> bytes:
    """The pipelined MAIL, RCPT, RSET for one probe; UnsafeAddress for a refused address."""
    if probe_address(address) is None:
        raise UnsafeAddress(f"not probed: {address[:80]!r}")
    return b"MAIL FROM:<>\r\nRCPT TO:<%s>\r\nRSET\r\n" % address.encode("ascii")


@dataclass(frozen=True, slots=True)
class LmtpReply:
    """One (possibly multi-line) reply: the code, its enhanced status code, the texts."""

    code: int
    lines: tuple[str, ...]
    enhanced: tuple[int, int, int] | None = None

    @property
    def text(self) -> str:
        return " / ".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class ReplyDecoder:
    """Incremental SMTP/LMTP reply decoder: `feed(bytes)` returns the complete replies."""

    __slots__ = ("_broken", "_buffer", "_lines")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[tuple[bytes, str]] = []  # (code, text) of a reply still going on
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete reply."""
        return len(self._buffer) + sum(len(text) + 4 for _, text in self._lines)

    def feed(self, data: bytes) -> list[LmtpReply]:
        """Decode what arrived; raise LmtpProtocolError once the stream is not replies."""
        if self._broken:
            raise LmtpProtocolError("stream already out of step")
        self._buffer += data
        out: list[LmtpReply] = []
        try:
            while (line := self._next_line()) is not None:
                reply = self._add_line(line)
                if reply is not None:
                    out.append(reply)
        except LmtpProtocolError:
            self._broken = True
            self._buffer.clear()
            self._lines.clear()
            raise
        return out

    def _next_line(self) -> bytes | None:
        end = self._buffer.find(b"\n", 0, MAX_REPLY_LINE + 1)
        if end < 0:
            if len(self._buffer) > MAX_REPLY_LINE:
                raise LmtpProtocolError(f"reply line longer than {MAX_REPLY_LINE} bytes")
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        # Like Postfix's own client: CRLF or a bare LF ends a line.
        return line[:-1] if line.endswith(b"\r") else line

    def _add_line(self, line: bytes) -> LmtpReply | None:
        code = line[:3]
        separator = line[3:4]
        if _CODE.fullmatch(code) is None or separator not in (b"", b" ", b"-"):
            raise LmtpProtocolError(f"not an SMTP reply line: {line[:40]!r}")
        if self._lines and self._lines[0][0] != code:
            raise LmtpProtocolError(f"reply code changed within one reply: {line[:40]!r}")
        if len(self._lines) >= MAX_REPLY_LINES:
            raise LmtpProtocolError(f"reply of more than {MAX_REPLY_LINES} lines")
        text = line[4:].decode("utf-8", errors="replace")
        self._lines.append((code, text))
        if separator == b"-":
            return None
        texts = tuple(t for _, t in self._lines)
        self._lines.clear()
        return _reply(int(code), texts)


def _reply(code: int, lines: tuple[str, ...]) -> LmtpReply:
    enhanced = None
    match = _ENHANCED.match(lines[0])
    # An enhanced code whose class differs from the reply's (e.g. "250 5.1.1") is ignored.
    if match is not None and int(match[1]) == code // 100:
        enhanced = (int(match[1]), int(match[2]), int(match[3]))
    return LmtpReply(code, lines, enhanced)


class MailboxStatus(enum.Enum):
    EXISTS = "exists"
    NO_SUCH_USER = "no such user"
    TEMPORARY = "temporary"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What a probe found; `kind` is a short bounded label (for one log line per kind)."""

    status: MailboxStatus
    kind: str = ""
    detail: str = ""

    @classmethod
    def temporary(cls, kind: str, detail: str) -> ProbeResult:
        return cls(MailboxStatus.TEMPORARY, kind, detail)


EXISTS = ProbeResult(MailboxStatus.EXISTS)
NO_SUCH_USER = ProbeResult(MailboxStatus.NO_SUCH_USER)


def rcpt_status(reply: LmtpReply) -> ProbeResult:
    """What Dovecot's reply to `RCPT TO:<address>` says about the mailbox (table above)."""
    first = reply.code // 100
    if reply.code in (250, 251):
        return EXISTS
    if reply.enhanced is not None and reply.enhanced[1:] == (2, 2):
        return EXISTS  # over quota: the mailbox exists
    if first == 5:
        if reply.enhanced is not None and reply.enhanced[1] in (1, 2):
            return NO_SUCH_USER
        if reply.enhanced is None and reply.code in (550, 551, 553):
            return NO_SUCH_USER
        return ProbeResult.temporary("unexpected 5xx to RCPT", f"Dovecot answered {reply}")
    if first == 4:
        return ProbeResult.temporary("4xx to RCPT", f"Dovecot answered {reply}")
    return ProbeResult.temporary("unexpected reply to RCPT", f"Dovecot answered {reply}")


class _ProbeFailed(Exception):
    """A probe that cannot give an answer; carries the TEMPORARY result."""

    def __init__(self, result: ProbeResult, *, before_reply: bool = False) -> None:
        super().__init__(result.detail)
        self.result = result
        # Nothing came back on a reused connection: it was stale, a new one may work.
        self.before_reply = before_reply


class _LmtpConnection:
    """One connection that has said LHLO; replies are read through its own decoder."""

    __slots__ = ("_decoder", "_replies", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = ReplyDecoder()
        self._replies: list[LmtpReply] = []
        self.idle_since = 0.0

    async def read_reply(self, what: str) -> LmtpReply:
        while not self._replies:
            try:
                data = await self.reader.read(4096)
            except OSError as exc:
                raise _ProbeFailed(
                    ProbeResult.temporary("connection lost", f"reading {what}: {exc}"),
                    before_reply=True,
                ) from None
            if not data:
                raise _ProbeFailed(
                    ProbeResult.temporary("connection lost", f"Dovecot closed before {what}"),
                    before_reply=self._decoder.pending == 0,
                )
            try:
                self._replies.extend(self._decoder.feed(data))
            except LmtpProtocolError as exc:
                raise _ProbeFailed(ProbeResult.temporary("malformed reply", str(exc))) from None
        return self._replies.pop(0)

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError as exc:
            raise _ProbeFailed(
                ProbeResult.temporary("connection lost", f"writing: {exc}"), before_reply=True
            ) from None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class MailboxProber:
    """Asks Dovecot's LMTP listener whether mailboxes exist; one instance per process.

    At most `max_connections` probes run at once, each on its own connection; finished
    connections wait (up to MAX_IDLE_SECONDS) for the next probe, so a busy map costs one
    round trip per lookup. `keep_connections=False` opens a new connection for every probe.
    """

    def __init__(
        self,
        target: ListenAddress,
        *,
        timeout: float = PROBE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        keep_connections: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.keep_connections = keep_connections
        self._clock = clock
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_LmtpConnection] = []
        self._closed = False
        self.connections_opened = 0  # for tests and measurements

    async def probe(self, address: str) -> ProbeResult:
        """EXISTS, NO_SUCH_USER or TEMPORARY for `address`; never raises for Dovecot's sake."""
        if probe_address(address) is None:
            raise UnsafeAddress(f"not probed: {address[:80]!r}")
        if self._closed:
            return ProbeResult.temporary("shutting down", "policyd is stopping")
        async with self._slots:
            try:
                return await asyncio.wait_for(self._probe(address), self.timeout)
            except TimeoutError:
                return ProbeResult.temporary(
                    "timeout", f"no answer from Dovecot LMTP at {self.target} in {self.timeout}s"
                )

    async def _probe(self, address: str) -> ProbeResult:
        conn = self._take_idle()
        if conn is not None:
            try:
                return await self._exchange(conn, address)
            except _ProbeFailed as exc:
                if not exc.before_reply:
                    return exc.result
            # The pooled connection was closed under us: one more try on a new connection.
        try:
            conn = await self._connect()
            return await self._exchange(conn, address)
        except _ProbeFailed as exc:
            return exc.result

    def _take_idle(self) -> _LmtpConnection | None:
        # The most recently used connection first; the ones left idle too long are closed,
        # so a quiet map does not hold Dovecot lmtp processes.
        now = self._clock()
        fresh = []
        for conn in self._idle:
            if now - conn.idle_since <= MAX_IDLE_SECONDS and not conn.reader.at_eof():
                fresh.append(conn)
            else:
                _close_soon(conn)
        self._idle = fresh
        return self._idle.pop() if self._idle else None

    async def _connect(self) -> _LmtpConnection:
        try:
            if self.target.kind == "unix":
                reader, writer = await asyncio.open_unix_connection(self.target.path)
            else:
                reader, writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise _ProbeFailed(
                ProbeResult.temporary("cannot connect", f"Dovecot LMTP at {self.target}: {reason}")
            ) from None
        self.connections_opened += 1
        conn = _LmtpConnection(reader, writer)
        try:
            greeting = await conn.read_reply("the greeting")
            if greeting.code != 220:
                raise _ProbeFailed(
                    ProbeResult.temporary("refused greeting", f"Dovecot greeted {greeting}")
                )
            await conn.send(f"LHLO {LHLO_NAME}\r\n".encode())
            lhlo = await conn.read_reply("the LHLO reply")
            if lhlo.code != 250:
                raise _ProbeFailed(
                    ProbeResult.temporary("refused LHLO", f"Dovecot answered {lhlo}")
                )
        except BaseException:
            _close_soon(conn)
            raise
        return conn

    async def _exchange(self, conn: _LmtpConnection, address: str) -> ProbeResult:
        reusable = False
        try:
            await conn.send(encode_probe(address))
            mail = await conn.read_reply("the MAIL reply")
            rcpt = await conn.read_reply("the RCPT reply")
            rset = await conn.read_reply("the RSET reply")
            reusable = rset.code == 250
            if mail.code != 250:
                return ProbeResult.temporary("refused MAIL", f"Dovecot answered {mail}")
            return rcpt_status(rcpt)
        finally:
            # Timeout, cancellation, a bad reply: the stream may be out of step, drop it.
            if reusable and self.keep_connections and not self._closed:
                conn.idle_since = self._clock()
                self._idle.append(conn)
            else:
                _close_soon(conn)

    async def close(self) -> None:
        """Close the pooled connections; later probes answer TEMPORARY."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(OSError):
                await conn.close()


def _close_soon(conn: _LmtpConnection) -> None:
    # Closing without waiting: a cancelled probe must not await anything more.
    conn.writer.close()
