"""`postwarden frontd`: hold the sockets Postfix talks to, pass bytes through, or stand in.

Postfix turns a whole session away when, at its start, the milter or the SASL server
cannot be reached (milter_fallback.py and sasl_fallback.py say how). frontd is the small
process that is always there instead: each connection from Postfix is joined to a fresh
connection to milterd (or Dovecot's auth socket) and from then on only moves bytes. When
that upstream does not accept, or does not answer the first packet within
`frontd.upstream_timeout` (frozen), frontd answers the session itself: for the milter,
"continue" until MAIL and 451 there; for SASL, the mechanisms, and at an AUTH either the
hand-over to a Dovecot that is back or a dropped connection, which Postfix reports as
454 4.7.0. One WARNING when an upstream goes away, one INFO when it
answers again, with the count of sessions answered in between.

Contract: docs/ARCHITECTURE.md, "What each daemon owns" (frontd).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from frontd import milter_fallback, sasl_fallback
from postwarden.config.model import Config
from postwarden.daemon.log_lines import setup_logging
from postwarden.daemon.socket_files import listening_socket
from postwarden.daemon.startup import (
    EXIT_OK,
    STOP_SIGNALS,
    StartupError,
    log_startup_failure,
    run_event_loop,
)
from postwarden.syntax.endpoints import ListenAddress

log = logging.getLogger("postwarden.frontd")

READ_SIZE = 65536
# A Postfix connection that sends nothing for this long is closed (Postfix's own milter
# and SASL timeouts are far shorter, so only a vanished client is reaped).
IDLE_TIMEOUT = 3600.0


class UpstreamUnavailable(Exception):
    """The upstream refused, timed out or closed before its first answer."""


class OutageLog:
    """One WARNING when an upstream stops answering, one INFO when it answers again."""

    def __init__(self, front: str, upstream: str, fallback: str) -> None:
        self.front = front
        self.upstream = upstream
        self.fallback = fallback
        self.answered_by_us = 0

    def unavailable(self, reason: str) -> None:
        if self.answered_by_us == 0:
            log.warning(
                "frontd: %s: %s does not answer (%s); %s until it does",
                self.front,
                self.upstream,
                reason,
                self.fallback,
            )
        self.answered_by_us += 1

    def available(self) -> None:
        if self.answered_by_us:
            log.info(
                "frontd: %s: %s answers again (%d sessions answered by frontd meanwhile)",
                self.front,
                self.upstream,
                self.answered_by_us,
            )
            self.answered_by_us = 0


async def open_upstream(
    address: ListenAddress, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to milterd or Dovecot; UpstreamUnavailable with the reason."""
    try:
        async with asyncio.timeout(timeout):
            if address.kind == "unix":
                return await asyncio.open_unix_connection(address.path, limit=READ_SIZE)
            return await asyncio.open_connection(address.host, address.port, limit=READ_SIZE)
    except TimeoutError:
        raise UpstreamUnavailable(f"no connection within {timeout:g} s") from None
    except OSError as exc:
        raise UpstreamUnavailable(exc.strerror or type(exc).__name__) from None


async def _read_some(reader: asyncio.StreamReader, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read(READ_SIZE)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()


async def splice(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Move bytes both ways until either side closes; then close both."""
    tasks = [
        asyncio.ensure_future(_copy(client[0], upstream[1])),
        asyncio.ensure_future(_copy(upstream[0], client[1])),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await _close(upstream[1])


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class MilterFront:
    """Postfix's milter socket, in front of milterd.listen[0]."""

    upstream: ListenAddress
    timeout: float
    outages: OutageLog

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = milter_fallback.PacketDecoder()
        try:
            # Postfix sends the option negotiation and waits for its answer.
            received = b""
            packets: list[milter_fallback.Packet] = []
            while not packets:
                data = await _read_some(reader, IDLE_TIMEOUT)
                if not data:
                    return
                received += data
                packets = list(decoder.feed(data))
            try:
                upstream, answer = await self._join(received)
            except UpstreamUnavailable as exc:
                self.outages.unavailable(str(exc))
            else:
                self.outages.available()
                writer.write(answer)
                await splice((reader, writer), upstream)
                return
            await self._answer(reader, writer, decoder, packets)
        except (milter_fallback.MilterViolation, TimeoutError, OSError) as exc:
            log.info("frontd: milter: connection closed: %s", exc or type(exc).__name__)
        finally:
            await _close(writer)

    async def _join(self, first: bytes) -> tuple[Stream, bytes]:
        """Connect to milterd and pass it `first`; its whole answer must come in time."""
        upstream = await open_upstream(self.upstream, self.timeout)
        decoder = milter_fallback.PacketDecoder()
        answer = b""
        try:
            upstream[1].write(first)
            async with asyncio.timeout(self.timeout):
                await upstream[1].drain()
                while True:
                    chunk = await upstream[0].read(READ_SIZE)
                    if not chunk:
                        raise UpstreamUnavailable("closed before answering")
                    answer += chunk
                    if list(decoder.feed(chunk)):
                        return upstream, answer
        except BaseException as exc:
            await _close(upstream[1])
            if isinstance(exc, TimeoutError):
                raise UpstreamUnavailable(f"no answer within {self.timeout:g} s") from None
            if isinstance(exc, (OSError, milter_fallback.MilterViolation)):
                raise UpstreamUnavailable(str(exc)) from None
            raise

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: milter_fallback.PacketDecoder,
        packets: list[milter_fallback.Packet],
    ) -> None:
        """Speak the milter protocol ourselves for the rest of the session."""
        while True:
            for packet in packets:
                reply = milter_fallback.fallback_reply(packet)
                if reply is not None:
                    writer.write(reply)
                if packet.command in milter_fallback.QUIT_COMMANDS:
                    await writer.drain()
                    return
            await writer.drain()
            data = await _read_some(reader, IDLE_TIMEOUT)
            if not data:
                return
            packets = list(decoder.feed(data))


@dataclass
class SaslFront:
    """Postfix's smtpd_sasl_path, in front of Dovecot's auth listener."""

    upstream: ListenAddress
    timeout: float
    outages: OutageLog
    connections: int = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            try:
                upstream, greeting = await self._join()
            except UpstreamUnavailable as exc:
                self.outages.unavailable(str(exc))
            else:
                self.outages.available()
                writer.write(greeting)
                await splice((reader, writer), upstream)
                return
            await self._answer(reader, writer)
        except (TimeoutError, OSError, ValueError) as exc:  # ValueError: a line over READ_SIZE
            log.info("frontd: sasl: connection closed: %s", exc or type(exc).__name__)
        finally:
            await _close(writer)

    async def _join(self) -> tuple[Stream, bytes]:
        """Connect to Dovecot, which speaks first; its greeting must come in time."""
        upstream = await open_upstream(self.upstream, self.timeout)
        try:
            greeting = await _read_some(upstream[0], self.timeout)
        except TimeoutError:
            await _close(upstream[1])
            raise UpstreamUnavailable(f"no greeting within {self.timeout:g} s") from None
        except OSError as exc:
            await _close(upstream[1])
            raise UpstreamUnavailable(str(exc)) from None
        if not greeting:
            await _close(upstream[1])
            raise UpstreamUnavailable("closed before its greeting")
        return upstream, greeting

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Announce the mechanisms in Dovecot's place, and at an AUTH ask Dovecot again.

        Postfix keeps this connection for many sessions, so Dovecot may be back by the time
        an AUTH comes: then the connection is handed over (Postfix's lines so far, then the
        AUTH; Dovecot's own greeting is not needed again) and only moves bytes from then
        on. Still away: the connection is closed unread, and Postfix answers 454 4.7.0.
        """
        cookie = secrets.token_hex(16)
        writer.write(sasl_fallback.handshake(os.getpid(), self.connections, cookie))
        await writer.drain()
        prelude: list[bytes] = []
        while True:
            async with asyncio.timeout(IDLE_TIMEOUT):
                line = await reader.readline()
            step = sasl_fallback.next_step(line, len(prelude))
            if step is sasl_fallback.Step.KEEP:
                prelude.append(line)
                continue
            if step is sasl_fallback.Step.CLOSE:
                return
            try:
                upstream, _ = await self._join()
            except UpstreamUnavailable as exc:
                self.outages.unavailable(str(exc))
                return
            self.outages.available()
            upstream[1].write(b"".join(prelude) + line)
            await splice((reader, writer), upstream)
            return


async def serve(cfg: Config) -> None:
    """Bind frontd's sockets and serve them until SIGTERM/SIGINT."""
    front = cfg.frontd
    mode = int(front.socket_mode, 8)
    milter = MilterFront(
        cfg.milterd.listen[0],
        front.upstream_timeout,
        OutageLog("milter", f"milterd at {cfg.milterd.listen[0]}", "answering 451 at MAIL"),
    )
    handlers: list[tuple[ListenAddress, Callable[..., Awaitable[None]]]] = [
        (front.milter_listen, milter.session)
    ]
    if front.sasl_listen is not None and front.sasl_upstream is not None:
        sasl = SaslFront(
            front.sasl_upstream,
            front.upstream_timeout,
            OutageLog(
                "sasl",
                f"Dovecot's auth service at {front.sasl_upstream}",
                "answering AUTH with 454 4.7.0 (temporary)",
            ),
        )
        handlers.append((front.sasl_listen, sasl.session))
    sockets: list[tuple[ListenAddress, socket.socket]] = []
    try:
        for address, _ in handlers:
            sockets.append((address, listening_socket(address, mode, front.socket_group)))
    except StartupError:
        _unlink_all(sockets)
        raise
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stopped.set)
    servers = []
    for (address, sock), (_, handler) in zip(sockets, handlers, strict=True):
        sock.setblocking(False)
        if address.kind == "unix":
            server = await asyncio.start_unix_server(handler, sock=sock, limit=READ_SIZE)
        else:
            server = await asyncio.start_server(handler, sock=sock, limit=READ_SIZE)
        servers.append(server)
        log.info("frontd: listening on %s", address)
    await stopped.wait()
    for server in servers:
        server.close()
    _unlink_all(sockets)
    log.info("frontd: stopped")


def _unlink_all(sockets: list[tuple[ListenAddress, socket.socket]]) -> None:
    for address, sock in sockets:
        sock.close()
        if address.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(address.path)


def run(cfg: Config) -> int:
    """`postwarden frontd`: the exit code (start-up failures are one log line)."""
    setup_logging(cfg.frontd.log_level, buffered=False)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload: sockets come from start
    try:
        run_event_loop(serve(cfg))
    except StartupError as exc:
        return log_startup_failure(log, "frontd", exc)
    return EXIT_OK
