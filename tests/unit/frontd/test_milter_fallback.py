"""frontd's milter protocol while milterd is away: continue until MAIL, 451 from there."""

from __future__ import annotations

import struct

import pytest

from frontd.milter_fallback import (
    MAX_PACKET,
    UNAVAILABLE_REPLY,
    MilterViolation,
    Packet,
    PacketDecoder,
    encode,
    fallback_reply,
    optneg_reply,
)

POSTFIX_OPTNEG = encode(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))


def _packets(data: bytes) -> list[Packet]:
    return list(PacketDecoder().feed(data))


def test_packets_come_out_the_same_however_the_reads_cut_them() -> None:
    stream = POSTFIX_OPTNEG + encode(b"C", b"client\0") + encode(b"Q")
    whole = _packets(stream)
    decoder = PacketDecoder()
    byte_by_byte = [p for i in range(len(stream)) for p in decoder.feed(stream[i : i + 1])]
    assert byte_by_byte == whole
    assert [chr(p.command) for p in whole] == ["O", "C", "Q"]


@pytest.mark.parametrize("length", [0, MAX_PACKET + 1])
def test_a_length_out_of_range_is_a_violation(length: int) -> None:
    with pytest.raises(MilterViolation):
        _packets(struct.pack("!I", length) + b"C")


def test_option_negotiation_takes_postfixs_version_and_asks_for_no_actions() -> None:
    (reply,) = _packets(optneg_reply(POSTFIX_OPTNEG[5:]))
    assert chr(reply.command) == "O"
    assert struct.unpack("!III", reply.data) == (6, 0, 0)


def test_an_older_mta_version_is_answered_with_that_version() -> None:
    (reply,) = _packets(optneg_reply(struct.pack("!III", 2, 0, 0)))
    assert struct.unpack("!III", reply.data)[0] == 2


@pytest.mark.parametrize("data", [b"", b"\0\0\0\6", struct.pack("!III", 1, 0, 0)])
def test_a_short_or_ancient_negotiation_is_a_violation(data: bytes) -> None:
    with pytest.raises(MilterViolation):
        optneg_reply(data)


@pytest.mark.parametrize("command", "CHLNBU")
def test_session_steps_before_mail_are_continued(command: str) -> None:
    assert fallback_reply(Packet(ord(command), b"x\0")) == encode(b"c")


@pytest.mark.parametrize("command", "MRTE")
def test_mail_and_everything_after_it_gets_the_451(command: str) -> None:
    (reply,) = _packets(fallback_reply(Packet(ord(command), b"<a@b>\0")) or b"")
    assert chr(reply.command) == "y"
    assert reply.data == UNAVAILABLE_REPLY.encode() + b"\0"
    assert reply.data.startswith(b"451 4.")


@pytest.mark.parametrize("command", "DAQK")
def test_macros_abort_and_quit_get_no_reply(command: str) -> None:
    assert fallback_reply(Packet(ord(command), b"")) is None
