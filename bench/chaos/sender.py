"""An MTA-like sender: N parallel sessions, every 4xx or dropped session retried with backoff.

Each message has a unique token (in its Message-ID, an `X-Chaos-Token:` header and the
body), so what Dovecot stored and what Postfix still queues can be counted per message.
Inbound mail comes from outside addresses (198.51.100.x, bound as the source address) to
port 25; outbound mail is a logged-in user's submission on 587 (STARTTLS, AUTH PLAIN).
A message ends accepted (250 after DATA), refused (5xx) or given up (attempts or time
exhausted); an outcome is final once reached, as a sending MTA's is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["inbound", "outbound", "forbidden", "dnsbl"]
GATEWAY_IP = "198.51.100.1"
# Outside clients; 198.51.100.7 is on the fixture's DNSBL zone (tests/fixtures/dns_server.py).
INBOUND_IPS = ("198.51.100.2", "198.51.100.3", "198.51.100.4", "198.51.100.5", "198.51.100.6")
DNSBL_LISTED_IP = "198.51.100.7"
FORBIDDEN_IP = "198.51.100.9"
# Roaming users, outside the trusted networks: ten addresses, as users on many networks.
SUBMITTER_IPS = tuple(f"198.51.100.{n}" for n in range(20, 30))
REMOTE_DOMAIN = "remote.test"
FORBIDDEN_DOMAIN = "blocked.test"
FORBIDDEN_MAILBOX = f"mallory@{REMOTE_DOMAIN}"
LOCAL_USERS = {"alice@example.test": "alice-secret", "bob@example.test": "bob-secret"}
ALL_SOURCE_IPS = (*INBOUND_IPS, DNSBL_LISTED_IP, FORBIDDEN_IP, *SUBMITTER_IPS)


@dataclass(frozen=True)
class Message:
    token: str
    kind: Kind
    sender: str
    recipient: str
    source_ip: str
    port: int
    login: tuple[str, str] | None = None

    def data(self) -> bytes:
        """The message text, CRLF, dot-stuffed, without the final dot line."""
        domain = self.sender.rsplit("@", 1)[1]
        lines = [
            f"From: <{self.sender}>",
            f"To: <{self.recipient}>",
            f"Subject: chaos {self.kind} {self.token}",
            f"Message-ID: <{self.token}@{domain}>",
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}",
            f"X-Chaos-Token: {self.token}",
            "",
            f"token {self.token}",
            "A line long enough to make the body more than a few bytes, as real mail is.",
            ".a line that starts with a dot, to be dot-stuffed",
        ]
        stuffed = [("." + line) if line.startswith(".") else line for line in lines]
        return ("\r\n".join(stuffed) + "\r\n").encode()


@dataclass(frozen=True)
class Ports:
    smtp: int = 25
    submission: int = 587


def plan_messages(count: int, seed: int, ports: Ports = Ports()) -> list[Message]:
    """The mix: ~58% inbound, ~35% authenticated submissions, ~5% forbidden, ~2% DNSBL."""
    rng = random.Random(seed)
    users = list(LOCAL_USERS)
    messages = []
    for n in range(count):
        token = f"chaos-{seed:x}-{n:06d}"
        roll = rng.random()
        rcpt = rng.choice(users)
        if roll < 0.35:
            login = rng.choice(users)
            other = next(u for u in users if u != login)
            messages.append(
                Message(
                    token,
                    "outbound",
                    login,
                    other,
                    SUBMITTER_IPS[n % len(SUBMITTER_IPS)],
                    ports.submission,
                    (login, LOCAL_USERS[login]),
                )
            )
        elif roll < 0.40:
            which = rng.randrange(3)
            sender, ip = (
                (f"spam{n}@{FORBIDDEN_DOMAIN}", rng.choice(INBOUND_IPS)),
                (FORBIDDEN_MAILBOX, rng.choice(INBOUND_IPS)),
                (f"sender{n % 50}@{REMOTE_DOMAIN}", FORBIDDEN_IP),
            )[which]
            messages.append(Message(token, "forbidden", sender, rcpt, ip, ports.smtp))
        elif roll < 0.42:
            sender = f"sender{n % 50}@{REMOTE_DOMAIN}"
            messages.append(Message(token, "dnsbl", sender, rcpt, DNSBL_LISTED_IP, ports.smtp))
        else:
            sender = f"sender{n % 50}@{REMOTE_DOMAIN}"
            ip = INBOUND_IPS[n % len(INBOUND_IPS)]
            messages.append(Message(token, "inbound", sender, rcpt, ip, ports.smtp))
    return messages


@dataclass(frozen=True)
class RetryPolicy:
    """Like a sending MTA's queue: backoff doubling from `first` to `longest`, bounded."""

    first: float = 1.0
    longest: float = 30.0
    max_attempts: int = 40
    max_total: float = 900.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.longest, self.first * 2.0 ** max(0, attempt - 1))
        return base * (0.75 + 0.5 * rng.random())


@dataclass
class Outcome:
    """What the sender saw for one message."""

    message: Message
    status: str = "pending"  # accepted, refused, gave_up
    attempts: int = 0
    first_try: float = 0.0
    finished: float = 0.0
    final_reply: str = ""
    # Sessions where DATA's end was sent but no reply came: the server may have taken it.
    ambiguous: int = 0
    replies: list[str] = field(default_factory=list)

    @property
    def waited(self) -> float:
        return self.finished - self.first_try


class SmtpTemporary(Exception):
    """A 4xx reply, a dropped connection or a timeout: try again later."""


class SmtpPermanent(Exception):
    """A 5xx reply: the message is refused for good."""


class _Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self, timeout: float) -> tuple[int, str]:
        lines: list[bytes] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise SmtpTemporary("connection closed" + (f" after {lines!r}" if lines else ""))
            lines.append(line.rstrip(b"\r\n"))
            if len(line) < 4 or line[3:4] != b"-":
                break
        try:
            code = int(lines[-1][:3])
        except ValueError as exc:
            raise SmtpTemporary(f"bad reply {lines!r}") from exc
        return code, b" / ".join(x[4:] for x in lines).decode(errors="replace")

    async def command(self, line: str, timeout: float, expect: int) -> str:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return self.check(await self.reply(timeout), expect, line.split(" ", 1)[0])

    @staticmethod
    def check(reply: tuple[int, str], expect: int, stage: str) -> str:
        code, text = reply
        if code // 100 == expect // 100:
            return text
        if 500 <= code < 600:
            raise SmtpPermanent(f"{stage} {code} {text}")
        raise SmtpTemporary(f"{stage} {code} {text}")


@dataclass
class SenderConfig:
    gateway: str = GATEWAY_IP
    sessions: int = 10
    command_timeout: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: ssl.SSLContext | None = None
    tls_server_name: str = "mx.example.test"
    seed: int = 1
    # Messages per second over all sessions (None: as fast as the sessions go).
    rate: float | None = None


async def _deliver_once(message: Message, config: SenderConfig, outcome: Outcome) -> str:
    """One SMTP session for one message; the 250 text after DATA, or an exception."""
    timeout = config.command_timeout
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                config.gateway, message.port, local_addr=(message.source_ip, 0)
            ),
            timeout,
        )
    except (OSError, TimeoutError) as exc:  # refused while Postfix is stopped
        raise SmtpTemporary(f"connect: {type(exc).__name__}: {exc}") from exc
    session = _Session(reader, writer)
    data_sent = False
    try:
        session.check(await session.reply(timeout), 220, "greeting")
        helo = "mail.remote.test" if message.login is None else "laptop.example.test"
        ehlo = await session.command(f"EHLO {helo}", timeout, 250)
        if message.login is not None:
            if "STARTTLS" not in ehlo.upper():
                raise SmtpTemporary("STARTTLS not offered")
            await session.command("STARTTLS", timeout, 220)
            assert config.tls is not None
            await asyncio.wait_for(
                writer.start_tls(config.tls, server_hostname=config.tls_server_name), timeout
            )
            ehlo = await session.command(f"EHLO {helo}", timeout, 250)
            if "AUTH" not in ehlo.upper():
                raise SmtpTemporary("AUTH not offered after STARTTLS")
            user, password = message.login
            blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            await session.command(f"AUTH PLAIN {blob}", timeout, 235)
        await session.command(f"MAIL FROM:<{message.sender}>", timeout, 250)
        await session.command(f"RCPT TO:<{message.recipient}>", timeout, 250)
        await session.command("DATA", timeout, 354)
        writer.write(message.data() + b".\r\n")
        data_sent = True
        await writer.drain()
        accepted = session.check(await session.reply(timeout), 250, "end of DATA")
        try:
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(writer.drain(), 5)
        except (OSError, TimeoutError):
            pass
        return accepted
    except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
        if data_sent:
            outcome.ambiguous += 1
        raise SmtpTemporary(f"{type(exc).__name__}: {exc}") from exc
    except SmtpTemporary:
        if data_sent:
            outcome.ambiguous += 1
        raise
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.wait_closed(), 5)


async def send_all(messages: list[Message], config: SenderConfig) -> list[Outcome]:
    """Send every message with `config.sessions` sessions; return one outcome each.

    A message waiting for its retry sits in a heap by its due time; a free session takes
    the earliest due one, or waits for it. With `config.rate`, new messages are started
    at that rate (retries are not limited, as a real queue's are not).
    """
    rng = random.Random(config.seed)
    monotonic = time.monotonic
    outcomes = {m.token: Outcome(m) for m in messages}
    start = monotonic()
    heap: list[tuple[float, int, str]] = []
    for i, m in enumerate(messages):
        due = start + (i / config.rate if config.rate else 0.0)
        heap.append((due, i, m.token))
    heapq.heapify(heap)
    order = {m.token: i for i, m in enumerate(messages)}
    in_flight = 0

    async def session_loop() -> None:
        nonlocal in_flight
        while heap or in_flight:
            if not heap:
                await asyncio.sleep(0.2)
                continue
            due, _, token = heap[0]
            now = monotonic()
            if due > now:
                await asyncio.sleep(min(due - now, 0.5))
                continue
            heapq.heappop(heap)
            outcome = outcomes[token]
            in_flight += 1
            try:
                await _attempt(outcome, now)
            finally:
                in_flight -= 1

    async def _attempt(outcome: Outcome, now: float) -> None:
        if outcome.attempts == 0:
            outcome.first_try = now
        outcome.attempts += 1
        try:
            text = await _deliver_once(outcome.message, config, outcome)
        except SmtpPermanent as exc:
            _finish(outcome, "refused", str(exc))
            return
        except SmtpTemporary as exc:
            reply = str(exc)
            if len(outcome.replies) < 50:
                outcome.replies.append(reply)
            elapsed = monotonic() - outcome.first_try
            if outcome.attempts >= config.retry.max_attempts or elapsed >= config.retry.max_total:
                _finish(outcome, "gave_up", reply)
                return
            due = monotonic() + config.retry.delay(outcome.attempts, rng)
            heapq.heappush(heap, (due, order[outcome.message.token], outcome.message.token))
            return
        _finish(outcome, "accepted", text)

    def _finish(outcome: Outcome, status: str, reply: str) -> None:
        outcome.status = status
        outcome.finished = monotonic()
        outcome.final_reply = reply

    await asyncio.gather(*(session_loop() for _ in range(config.sessions)))
    return [outcomes[m.token] for m in messages]
