"""Sans-IO codec of Postfix's socketmap protocol (socketmap_table(5)): netstrings.

Each request is a netstring `<len>:<name> <key>,`; each reply is a netstring `OK <data>`,
`NOTFOUND `, `TEMP <reason>`, `TIMEOUT <reason>` or `PERM <reason>`. Postfix keeps the
connection open and sends one request after the other. `NetstringDecoder.feed()` returns
complete requests (or raises one fatal `SocketmapViolation`) and keeps leftover bytes;
replies are values with `encode()`. What the maps answer is in lookup_maps.py.

| input                                   | what happens                                   |
| --------------------------------------- | ---------------------------------------------- |
| length prefix not digits / too long     | BadNetstring (fatal): connection closed        |
| payload over MAX_REQUEST_LENGTH         | RequestTooLarge (fatal): connection closed     |
| payload not followed by ","             | BadNetstring (fatal): connection closed        |
| request without "<name> <key>"          | MalformedRequest: `PERM` reply, stays in step  |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from postwarden.syntax.untrusted_text import sanitise

# Postfix sends "<name> <address>"; an address is at most a few hundred bytes
# (line_length_limit is 2048), so anything near this is not Postfix.
MAX_REQUEST_LENGTH = 4096
# Postfix's socketmap_max_reply_size default: larger replies are refused by the client.
MAX_REPLY_LENGTH = 100_000
# Longest failure reason sent back (it ends up in one line of Postfix's log).
MAX_REASON = 200
_MAX_LENGTH_DIGITS = len(str(MAX_REQUEST_LENGTH))


class SocketmapViolation(Exception):
    """Bytes that are not a netstring; the connection cannot stay in step and is closed."""


class BadNetstring(SocketmapViolation):
    pass


class RequestTooLarge(SocketmapViolation):
    pass


@dataclass(frozen=True, slots=True)
class SocketmapRequest:
    """One lookup: the map name from Postfix's table definition and the key."""

    name: str
    key: str


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """A well-framed netstring that is not `<name> <key>`; answered PERM, not fatal."""

    payload: str


DecodeResult = SocketmapRequest | MalformedRequest


def encode_netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class NetstringDecoder:
    """Incremental netstring decoder: `feed(bytes)` returns the complete requests, in order."""

    __slots__ = ("_broken", "_buffer")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._broken = False

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a complete request."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[DecodeResult]:
        """Decode what arrived; raise SocketmapViolation once the stream is not netstrings."""
        if self._broken:
            raise BadNetstring("stream already out of step")
        self._buffer += data
        out: list[DecodeResult] = []
        try:
            while (payload := self._next_payload()) is not None:
                out.append(_parse_request(payload))
        except SocketmapViolation:
            self._broken = True
            self._buffer.clear()
            raise
        return out

    def _next_payload(self) -> bytes | None:
        colon = self._buffer.find(b":", 0, _MAX_LENGTH_DIGITS + 1)
        if colon < 0:
            prefix = bytes(self._buffer[: _MAX_LENGTH_DIGITS + 1])
            if not prefix.isdigit() and prefix:
                raise BadNetstring(f"length prefix is not a number: {prefix[:16]!r}")
            if len(prefix) > _MAX_LENGTH_DIGITS:
                raise RequestTooLarge(f"length prefix longer than {_MAX_LENGTH_DIGITS} digits")
            return None
        digits = bytes(self._buffer[:colon])
        if not digits.isdigit():
            raise BadNetstring(f"length prefix is not a number: {digits[:16]!r}")
        # Netstrings forbid leading zeros except for "0" itself (cr.yp.to/proto/netstrings).
        if len(digits) > 1 and digits.startswith(b"0"):
            raise BadNetstring(f"length prefix with a leading zero: {digits!r}")
        length = int(digits)
        if length > MAX_REQUEST_LENGTH:
            raise RequestTooLarge(f"request of {length} bytes (limit {MAX_REQUEST_LENGTH})")
        end = colon + 1 + length
        if len(self._buffer) <= end:
            return None
        if self._buffer[end : end + 1] != b",":
            raise BadNetstring("netstring not terminated by ','")
        payload = bytes(self._buffer[colon + 1 : end])
        del self._buffer[: end + 1]
        return payload


def _parse_request(payload: bytes) -> DecodeResult:
    # An address with 8-bit bytes that are not UTF-8 cannot match a stored alias; decoding
    # with replacements keeps every string downstream valid Unicode.
    text = payload.decode("utf-8", errors="replace")
    name, sep, key = text.partition(" ")
    if not sep or not name or not key or "\x00" in text:
        return MalformedRequest(text)
    return SocketmapRequest(name, key)


Status = Literal["OK", "NOTFOUND", "TEMP", "TIMEOUT", "PERM"]


@dataclass(frozen=True, slots=True)
class SocketmapReply:
    status: Status
    data: str = ""

    def encode(self) -> bytes:
        # Reasons end up in Postfix's log line: one line, printable, bounded.
        data = self.data
        if self.status != "OK":
            data = sanitise(data, MAX_REASON)
        return encode_netstring(f"{self.status} {data}".encode())


NOT_FOUND = SocketmapReply("NOTFOUND")
