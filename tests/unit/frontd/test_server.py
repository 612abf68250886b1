"""frontd's front ends over real unix sockets: pass-through while the upstream answers,
standing in while it is absent, refusing or frozen, and one WARNING per outage."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path

import pytest

from frontd.milter_fallback import UNAVAILABLE_REPLY, PacketDecoder, encode
from frontd.server import MilterFront, OutageLog, SaslFront
from postwarden.syntax.endpoints import ListenAddress

TIMEOUT = 0.3
OPTNEG = encode(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
# What our fake milterd answers: told apart from frontd's own (6, 0, 0) by its actions.
UPSTREAM_OPTNEG = encode(b"O", struct.pack("!III", 6, 0x10, 0))
DOVECOT_GREETING = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nSPID\t1\nCUID\t1\nDONE\n"


async def _serve(front_session, path: Path) -> asyncio.AbstractServer:
    return await asyncio.start_unix_server(front_session, path=str(path))


async def _close_all(writer: asyncio.StreamWriter, *servers: asyncio.AbstractServer) -> None:
    """Close the client and the servers, and let both ends of every pipe see it."""
    writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()
    await asyncio.sleep(0.2)


async def _read_packets(reader: asyncio.StreamReader, count: int) -> list[tuple[str, bytes]]:
    decoder, packets = PacketDecoder(), []
    while len(packets) < count:
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, f"closed after {packets}"
        packets += [(chr(p.command), p.data) for p in decoder.feed(data)]
    return packets


def _milter_front(tmp_path: Path) -> MilterFront:
    upstream = ListenAddress("unix", path=str(tmp_path / "milterd.sock"))
    return MilterFront(upstream, TIMEOUT, OutageLog("milter", "milterd", "answering 451"))


async def _milter_session_without_milterd(tmp_path: Path, front: MilterFront) -> list:
    server = await _serve(front.session, tmp_path / "front.sock")
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
    writer.write(OPTNEG)
    answers = await _read_packets(reader, 1)
    writer.write(encode(b"D", b"Cj\0host\0") + encode(b"C", b"client\0") + encode(b"H", b"x\0"))
    answers += await _read_packets(reader, 2)
    writer.write(encode(b"M", b"<a@example.test>\0"))
    answers += await _read_packets(reader, 1)
    writer.write(encode(b"Q"))
    closed = await asyncio.wait_for(reader.read(), 5)
    await _close_all(writer, server)
    return [*answers, ("closed", closed)]


def test_without_milterd_the_session_is_continued_until_mail_which_gets_451(
    tmp_path: Path,
) -> None:
    answers = asyncio.run(_milter_session_without_milterd(tmp_path, _milter_front(tmp_path)))
    assert answers[0] == ("O", struct.pack("!III", 6, 0, 0))
    assert answers[1:3] == [("c", b""), ("c", b"")]
    assert answers[3] == ("y", UNAVAILABLE_REPLY.encode() + b"\0")
    assert answers[4] == ("closed", b"")


def test_a_frozen_milterd_is_stood_in_for_after_the_upstream_timeout(tmp_path: Path) -> None:
    # A listening socket nobody accepts on: connect() succeeds, no answer ever comes.
    frozen = socket.socket(socket.AF_UNIX)
    frozen.bind(str(tmp_path / "milterd.sock"))
    frozen.listen(8)
    try:
        answers = asyncio.run(_milter_session_without_milterd(tmp_path, _milter_front(tmp_path)))
    finally:
        frozen.close()
    assert answers[0] == ("O", struct.pack("!III", 6, 0, 0))
    assert answers[3][1].startswith(b"451 ")


async def _fake_milterd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    decoder = PacketDecoder()
    while data := await reader.read(65536):
        for packet in decoder.feed(data):
            writer.write(UPSTREAM_OPTNEG if packet.command == ord("O") else encode(b"a"))
        await writer.drain()
    writer.close()


def test_with_milterd_answering_every_byte_passes_through(tmp_path: Path) -> None:
    async def scenario() -> list:
        upstream = await _serve(_fake_milterd, tmp_path / "milterd.sock")
        front = _milter_front(tmp_path)
        server = await _serve(front.session, tmp_path / "front.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
        writer.write(OPTNEG)
        answers = await _read_packets(reader, 1)
        writer.write(encode(b"M", b"<a@example.test>\0") + encode(b"E"))
        answers += await _read_packets(reader, 2)
        await _close_all(writer, server, upstream)
        return answers

    answers = asyncio.run(scenario())
    assert answers == [("O", UPSTREAM_OPTNEG[5:]), ("a", b""), ("a", b"")]


def test_an_outage_is_logged_once_and_its_end_once_with_the_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    front = _milter_front(tmp_path)

    async def scenario() -> None:
        for _ in range(3):
            await _milter_session_without_milterd(tmp_path, front)
        upstream = await _serve(_fake_milterd, tmp_path / "milterd.sock")
        server = await _serve(front.session, tmp_path / "front.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
        writer.write(OPTNEG)
        await _read_packets(reader, 1)
        await _close_all(writer, server, upstream)

    with caplog.at_level(logging.INFO, logger="postwarden.frontd"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "milterd does not answer" in warnings[0]
    assert any("answers again (3 sessions" in r.getMessage() for r in caplog.records)


def _sasl_front(tmp_path: Path) -> SaslFront:
    upstream = ListenAddress("unix", path=str(tmp_path / "auth.sock"))
    return SaslFront(upstream, TIMEOUT, OutageLog("sasl", "dovecot", "answering 454"))


def test_without_dovecot_the_mechanisms_are_announced_and_an_auth_is_dropped(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        server = await _serve(_sasl_front(tmp_path).session, tmp_path / "front.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
        greeting = await asyncio.wait_for(reader.readuntil(b"DONE\n"), 5)
        writer.write(b"VERSION\t1\t0\nCPID\t99\n")
        writer.write(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=AGFsaWNlAHNlY3JldA==\n")
        rest = await asyncio.wait_for(reader.read(), 5)
        await _close_all(writer, server)
        return greeting, rest

    greeting, rest = asyncio.run(scenario())
    assert greeting.startswith(b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n")
    assert rest == b""  # closed at the AUTH, answered by nothing: Postfix says 454


def test_dovecot_back_by_the_first_auth_takes_over_the_stand_in_connection(
    tmp_path: Path,
) -> None:
    seen: list[bytes] = []

    async def fake_dovecot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(DOVECOT_GREETING)
        while len(seen) < 3:
            seen.append(await reader.readline())
        writer.write(b"OK\t1\tuser=alice\n")
        await writer.drain()
        writer.close()

    async def scenario() -> bytes:
        front = _sasl_front(tmp_path)
        server = await _serve(front.session, tmp_path / "front.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
        await asyncio.wait_for(reader.readuntil(b"DONE\n"), 5)  # frontd's: Dovecot is away
        writer.write(b"VERSION\t1\t0\nCPID\t99\n")
        await writer.drain()
        upstream = await _serve(fake_dovecot, tmp_path / "auth.sock")  # Dovecot is back
        writer.write(b"AUTH\t1\tPLAIN\tservice=smtp\n")
        answer = await asyncio.wait_for(reader.readline(), 5)
        await _close_all(writer, server, upstream)
        return answer

    assert asyncio.run(scenario()) == b"OK\t1\tuser=alice\n"
    assert seen == [b"VERSION\t1\t0\n", b"CPID\t99\n", b"AUTH\t1\tPLAIN\tservice=smtp\n"]


def test_with_dovecot_answering_the_greeting_and_requests_pass_through(tmp_path: Path) -> None:
    seen: list[bytes] = []

    async def fake_dovecot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(DOVECOT_GREETING)
        line = await reader.readline()
        seen.append(line)
        writer.write(b"OK\t1\tuser=alice\n")
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[bytes, bytes]:
        upstream = await _serve(fake_dovecot, tmp_path / "auth.sock")
        server = await _serve(_sasl_front(tmp_path).session, tmp_path / "front.sock")
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "front.sock"))
        greeting = await asyncio.wait_for(reader.readuntil(b"DONE\n"), 5)
        writer.write(b"AUTH\t1\tPLAIN\tservice=smtp\n")
        answer = await asyncio.wait_for(reader.readline(), 5)
        await _close_all(writer, server, upstream)
        return greeting, answer

    greeting, answer = asyncio.run(scenario())
    assert greeting == DOVECOT_GREETING
    assert answer == b"OK\t1\tuser=alice\n"
    assert seen == [b"AUTH\t1\tPLAIN\tservice=smtp\n"]
