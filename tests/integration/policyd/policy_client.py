"""A Postfix-like client of the real policyd: requests, answers, closed connections."""

from __future__ import annotations

import asyncio

from tests.fixtures.policyd_daemon import (
    PolicydHandle,
)

DEFER = b"action=DEFER_IF_PERMIT 4.7.1 Greylisted, please try again later\n\n"
DUNNO = b"action=DUNNO\n\n"
ANSWER_TIMEOUT = 5.0


def request(**attrs: str) -> bytes:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "mail.example.org",
        "helo_name": "mail.example.org",
        "sender": "alice@example.org",
        "recipient": "bob@example.com",
        "queue_id": "4Bf3xY1z2Qz9",
        "instance": "1a2b.3c4d.5e6f.0",
    }
    base.update(attrs)
    return b"".join(f"{k}={v}\n".encode() for k, v in base.items()) + b"\n"


async def open_client(
    daemon: PolicydHandle, tcp: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tcp:
        assert daemon.tcp_port is not None
        return await asyncio.open_connection("127.0.0.1", daemon.tcp_port)
    return await asyncio.open_unix_connection(str(daemon.socket_path))


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readuntil(b"\n\n"), ANSWER_TIMEOUT)


async def ask_once(daemon: PolicydHandle, data: bytes) -> bytes:
    reader, writer = await open_client(daemon)
    try:
        return await ask(reader, writer, data)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(100), ANSWER_TIMEOUT) == b""
    except ConnectionResetError:
        return True
