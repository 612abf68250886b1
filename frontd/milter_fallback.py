"""The milter protocol as frontd speaks it while milterd cannot be reached: pure, over bytes.

Postfix talks to a milter at the start of every session (OPTNEG, CONNECT, HELO). When that
fails, `milter_default_action = tempfail` turns the whole session away: STARTTLS answers
`454 4.3.0` and AUTH is never offered, so a mail client reports a TLS or login problem.
Answering those first steps ourselves ("continue") and refusing at MAIL with a 451 keeps
the session usable and tells the client the one true thing: try again later. Nothing is
accepted on this path, so no message goes unsigned or unverified.

The wire format (libmilter's mfdef.h): a 4-byte big-endian length, then that many bytes,
the first of which is the command. Commands that get no reply: macros (D), abort (A),
quit (Q) and quit-for-a-new-connection (K). Everything else the MTA sends, we answer.

Contract: docs/ARCHITECTURE.md, "What each daemon owns" (frontd).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

# libmilter's own limit on one packet (MILTER_CHUNK_SIZE 65535 plus the command's header).
MAX_PACKET = 65535 + 1024
# The version we announce at most (Postfix speaks 6) and the steps we want to see: all of
# them (no SMFIP_NO* bits), and replying to each (no SMFIP_NR_* bits).
MILTER_VERSION = 6
OPTNEG = b"O"
NO_REPLY = frozenset(b"DAQK")
QUIT_COMMANDS = frozenset(b"QK")
# MAIL, RCPT, DATA and end of message: refused while milterd is away.
REFUSED_COMMANDS = frozenset(b"MRTE")
# The reply at MAIL while milterd is away (Postfix logs it as "milter-reject").
UNAVAILABLE_REPLY = "451 4.3.0 Mail filter (DKIM) unavailable, try again later"

_LENGTH = struct.Struct("!I")


class MilterViolation(Exception):
    """The MTA sent something that is not the milter protocol: close the connection."""


@dataclass(frozen=True)
class Packet:
    command: int  # the command byte, e.g. ord("M")
    data: bytes


def encode(command: bytes, data: bytes = b"") -> bytes:
    """One packet on the wire."""
    return _LENGTH.pack(len(command) + len(data)) + command + data


class PacketDecoder:
    """Splits a byte stream into packets, however the reads cut it."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[Packet]:
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length == 0 or length > MAX_PACKET:
                raise MilterViolation(f"packet length {length} out of range")
            if len(self._buffer) < _LENGTH.size + length:
                return
            body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            yield Packet(body[0], body[1:])


def optneg_reply(data: bytes) -> bytes:
    """Our answer to the MTA's option negotiation: its version (at most 6), no actions."""
    if len(data) < 12:
        raise MilterViolation(f"option negotiation of {len(data)} bytes (12 expected)")
    version = min(_LENGTH.unpack_from(data)[0], MILTER_VERSION)
    if version < 2:
        raise MilterViolation(f"milter protocol version {version} is too old")
    return encode(OPTNEG, struct.pack("!III", version, 0, 0))


def fallback_reply(packet: Packet) -> bytes | None:
    """What we answer to one packet while milterd is away; None: no answer is due.

    Continue through CONNECT, HELO and the like; 451 at MAIL, so no message starts.
    Postfix sends no RCPT, DATA or end of message after a refused MAIL; should it, they
    get the 451 too, so that nothing is ever accepted unseen by milterd.
    """
    if packet.command == OPTNEG[0]:
        return optneg_reply(packet.data)
    if packet.command in NO_REPLY:
        return None
    if packet.command in REFUSED_COMMANDS:
        return encode(b"y", UNAVAILABLE_REPLY.encode() + b"\0")
    return encode(b"c")
