#!/usr/bin/env python3
"""The gateway's attack surface, probed from outside: relay, AUTH before TLS, STARTTLS
command injection, SMTP smuggling.

Run as root on the gateway host (CI runs it after vagrant/smoke.sh):

    attack_surface.py --target 198.51.100.1 --target6 2001:db8::1 \\
        --local-domain example.org --local-user smoke [--mail-root /var/mail/vhosts] \\
        [--ports smtp=25,submission=587,smtps=465,imap=143,imaps=993,pop3=110,pop3s=995] \\
        [--permit-client --postwarden "postwarden --config /etc/postwarden/postwarden.toml"]

Loopback is a trusted network, so the probes come from elsewhere: a private network
namespace (`pwattack-…`) joined to this host by a veth pair, host side 198.51.100.1/24 and
2001:db8::1/64, namespace side 198.51.100.2 and 2001:db8::2 (documentation addresses; the
namespace has no other route). Every probe runs in a child process inside the namespace
(`ip netns exec`); the namespace and its veth are removed at the end, whatever happened.

Each probe is a named attack with a verdict (ACCEPTED, refused, closed when its port does
not answer, untested when it could not be carried out) and the server's reply; the last
line is `attack surface: N probes, M accepted attacks`. Exit status: 0 none accepted,
1 some accepted, 2 setup failure (namespace, port 25 closed, a probe left untested).

Only the standard library is used, so any Python 3.11 runs it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

NETNS_PREFIX = "pwattack-"
HOST_V4, HOST_V6 = "198.51.100.1", "2001:db8::1"
ATTACKER_V4, ATTACKER_V6 = "198.51.100.2", "2001:db8::2"
OUTSIDE = "outside.example"  # reserved (RFC 2606): never a real destination
ATTACKER = f"attacker@{OUTSIDE}"
HELO = f"attacker.{OUTSIDE}"
DEFAULT_PORTS = {
    "smtp": 25,
    "submission": 587,
    "smtps": 465,
    "imap": 143,
    "imaps": 993,
    "pop3": 110,
    "pop3s": 995,
}

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 20.0  # Postfix may wait ~3 s on a mailbox probe, Dovecot 2 s on a bad login
QUIET_WAIT = 2.0  # how long to listen for replies nobody asked for
RELAY_BATCH = 6  # RCPTs per session: Postfix delays replies after 10 errors, drops at 20
TEMPORARY_RETRIES = 3  # a 4xx is asked again this often; a real sender would retry too
TEMPORARY_PAUSE = 2.0
PHASE_TIMEOUT = 600.0
DELIVERY_WAIT = 20.0
MAX_READ = 1 << 20

ACCEPTED, REFUSED, CLOSED, UNTESTED = "ACCEPTED", "refused", "closed", "untested"


class SetupError(Exception):
    """The check could not be set up (namespace, addresses, permitted entries)."""


class ProbeError(Exception):
    """A conversation broke off (connection closed, timeout, TLS failure)."""


@dataclass(frozen=True)
class Result:
    """One attack and what the server did with it."""

    name: str
    verdict: str
    reply: str

    def line(self) -> str:
        return f"{self.verdict:<8} {self.name}: {self.reply}"


@dataclass(frozen=True)
class Target:
    """Where the probes go and which mailbox is ours."""

    v4: str
    v6: str
    ports: dict[str, int]
    domain: str
    user: str
    mail_root: Path | None

    @property
    def mailbox(self) -> str:
        return f"{self.user}@{self.domain}"


def sanitized(data: bytes | str, limit: int = 200) -> str:
    """Untrusted server text on one printable line (control characters escaped)."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = text.strip()
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


# --- one TCP conversation ---------------------------------------------------------------------


class Conversation:
    """A line-oriented client connection that can switch to TLS in place."""

    def __init__(self, address: str, port: int, *, implicit_tls: bool = False) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_STREAM)
        raw.settimeout(CONNECT_TIMEOUT)
        try:
            raw.connect((address, port))
        except OSError:
            raw.close()
            raise
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = raw
        self.buffer = b""
        self.tls = False
        if implicit_tls:
            self.start_tls()

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """One write: pipelined commands leave in one segment (TCP_NODELAY, one sendall)."""
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ProbeError(f"send failed: {exc}") from None

    def start_tls(self) -> None:
        # The gateway may run on its self-signed pair: this checks its protocol, not its PKI.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock.settimeout(REPLY_TIMEOUT)
        try:
            self.sock = ctx.wrap_socket(self.sock)
        except (OSError, ssl.SSLError) as exc:
            raise ProbeError(f"TLS handshake failed: {exc}") from None
        self.tls = True

    def _fill(self, timeout: float) -> bool:
        """Read once more; False at timeout. Raises ProbeError when the peer closed."""
        if len(self.buffer) > MAX_READ:
            raise ProbeError("server sent too much")
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (OSError, ssl.SSLError) as exc:
            raise ProbeError(f"connection failed: {exc}") from None
        if not chunk:
            raise ProbeError("connection closed by the server")
        self.buffer += chunk
        return True

    def line(self, timeout: float = REPLY_TIMEOUT) -> bytes:
        """The next line (without its line end)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                raise ProbeError(f"no reply within {timeout:.0f}s")
        head, _, self.buffer = self.buffer.partition(b"\n")
        return head.rstrip(b"\r")

    def unrequested(self, wait: float = QUIET_WAIT) -> bytes:
        """Whatever the server sends within `wait` seconds without being asked."""
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                self._fill(max(0.05, deadline - time.monotonic()))
        except ProbeError:
            pass
        data, self.buffer = self.buffer, b""
        return data


# --- SMTP ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return sanitized(f"{self.code} " + " / ".join(self.lines))


class Smtp(Conversation):
    """An SMTP client that speaks exactly what it is told."""

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        lines: list[str] = []
        for _ in range(100):
            raw = self.line(timeout)
            if len(raw) < 3 or not raw[:3].isdigit():
                raise ProbeError(f"not an SMTP reply: {sanitized(raw)}")
            lines.append(raw[4:].decode("utf-8", "replace"))
            if raw[3:4] != b"-":
                return Reply(int(raw[:3]), tuple(lines))
        raise ProbeError("endless multi-line reply")

    def command(self, text: str) -> Reply:
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def greet(self) -> Reply:
        """Greeting and EHLO; a refusal at either raises ProbeError with the reply."""
        greeting = self.reply()
        if greeting.code != 220:
            raise ProbeError(f"greeting: {greeting.text}")
        ehlo = self.command(f"EHLO {HELO}")
        if ehlo.code != 250:
            raise ProbeError(f"EHLO: {ehlo.text}")
        return ehlo

    def starttls(self) -> Reply:
        reply = self.command("STARTTLS")
        if reply.code != 220:
            raise ProbeError(f"STARTTLS: {reply.text}")
        self.start_tls()
        return self.greet_again()

    def greet_again(self) -> Reply:
        ehlo = self.command(f"EHLO {HELO}")
        if ehlo.code != 250:
            raise ProbeError(f"EHLO after TLS: {ehlo.text}")
        return ehlo


def ehlo_keywords(ehlo: Reply) -> list[str]:
    return [line.split()[0].upper() for line in ehlo.lines[1:] if line.split()]


def open_smtp(address: str, port: int, mode: str) -> Smtp:
    """A greeted session: mode "plain", "starttls" (upgraded) or "tls" (implicit, 465)."""
    smtp = Smtp(address, port, implicit_tls=mode == "tls")
    try:
        smtp.greet()
        if mode == "starttls":
            smtp.starttls()
    except BaseException:
        smtp.close()
        raise
    return smtp


# --- port scan -------------------------------------------------------------------------------


class Ports:
    """Which (address, port) answer a TCP connect, asked once each."""

    def __init__(self) -> None:
        self.known: dict[tuple[str, int], bool] = {}

    def open(self, address: str, port: int) -> bool:
        key = (address, port)
        if key not in self.known:
            try:
                Conversation(address, port).close()
                self.known[key] = True
            except OSError:
                self.known[key] = False
        return self.known[key]


# --- (a) relay -------------------------------------------------------------------------------


def relay_forms(target: Target) -> list[tuple[str, str, str]]:
    """(name, MAIL FROM, RCPT TO): addresses that must not reach outside without login."""
    d, own4 = target.domain, target.v4
    return [
        ("plain", ATTACKER, f"user@{OUTSIDE}"),
        ("quoted-at", ATTACKER, f'"user@{OUTSIDE}"@{d}'),
        ("quoted-at-unqualified", ATTACKER, f'"user@{OUTSIDE}"'),
        ("percent-hack", ATTACKER, f"user%{OUTSIDE}@{d}"),
        ("percent-hack-own-ip", ATTACKER, f"user%{OUTSIDE}@[{own4}]"),
        ("percent-hack-ip-literal", ATTACKER, f"user%[198.51.100.99]@{d}"),
        ("percent-unqualified", ATTACKER, f"user%{OUTSIDE}"),
        ("quoted-percent", ATTACKER, f'"user%{OUTSIDE}"@{d}'),
        ("bang-path", ATTACKER, f"{OUTSIDE}!user@{d}"),
        ("bang-path-own-ip", ATTACKER, f"{OUTSIDE}!user@[{own4}]"),
        ("bang-unqualified", ATTACKER, f"{OUTSIDE}!user"),
        ("bang-via-local-domain", ATTACKER, f"{d}!{OUTSIDE}!user@{d}"),
        ("source-route", ATTACKER, f"@{d}:user@{OUTSIDE}"),
        ("source-route-own-ip", ATTACKER, f"@[{own4}]:user@{OUTSIDE}"),
        ("double-at", ATTACKER, f"user@{OUTSIDE}@{d}"),
        ("double-at-own-ip", ATTACKER, f"user@{OUTSIDE}@[{own4}]"),
        ("ip-literal", ATTACKER, "user@[198.51.100.99]"),
        ("ipv6-literal", ATTACKER, "user@[IPv6:2001:db8::99]"),
        ("trailing-dot", ATTACKER, f"user@{OUTSIDE}."),
        ("upper-case", ATTACKER, f"USER@{OUTSIDE.upper()}"),
        ("local-domain-as-prefix", ATTACKER, f"user@{d}.{OUTSIDE}"),
        ("local-domain-as-suffix", ATTACKER, f"user@outside{d}"),
        ("subdomain-of-local", ATTACKER, f"user@relay.{d}"),
        ("localhost", ATTACKER, "user@localhost"),
        ("loopback-literal", ATTACKER, "user@[127.0.0.1]"),
        ("own-ip-literal", ATTACKER, f"user@[{own4}]"),
        ("postmaster-outside", ATTACKER, f"postmaster@{OUTSIDE}"),
        ("null-sender", "", f"user@{OUTSIDE}"),
        ("odd-sender-source-route", f"@{d}:{ATTACKER}", f"user@{OUTSIDE}"),
        ("local-sender", target.mailbox, f"user@{OUTSIDE}"),
        ("local-postmaster-sender", f"postmaster@{d}", f"user@{OUTSIDE}"),
    ]


def _rcpt_attempt(smtp: Smtp, sender: str, rcpt: str) -> Reply:
    """MAIL + RCPT; the reply that decided (MAIL's when MAIL was refused)."""
    mail = smtp.command(f"MAIL FROM:<{sender}>")
    if mail.code // 100 != 2:
        return mail
    return smtp.command(f"RCPT TO:<{rcpt}>")


def relay_batch(
    address: str, port: int, mode: str, forms: Sequence[tuple[str, str, str]]
) -> dict[str, Reply | str]:
    """Each form's RCPT reply (or why there is none), a few forms per session."""
    out: dict[str, Reply | str] = {}
    pending = list(forms)
    for _ in range(len(forms) + 1):  # every session answers at least one form
        if not pending:
            break
        in_flight: str | None = None
        progressed = False
        try:
            with open_smtp(address, port, mode) as smtp:
                for _count in range(RELAY_BATCH):
                    if not pending:
                        break
                    name, sender, rcpt = pending[0]
                    in_flight = name
                    out[name] = _rcpt_attempt(smtp, sender, rcpt)
                    pending.pop(0)
                    in_flight, progressed = None, True
                    smtp.command("RSET")
        except (OSError, ProbeError) as exc:
            # The form in flight is answered by the failure (the server would not go on); a
            # session that broke before any form (greeting, TLS) answers the next one.
            if in_flight is None and not progressed and pending:
                in_flight = pending[0][0]
            if in_flight is not None:
                out[in_flight] = sanitized(str(exc))
                pending.pop(0)
    return out


def relay_probes(
    target: Target, ports: Ports, tag: str, address: str, family: str
) -> Iterator[Result]:
    forms = relay_forms(target)
    services = [
        ("smtp", "plain", forms),
        # Submission without login: before STARTTLS, after it, and on implicit TLS.
        ("submission", "plain", forms[:4]),
        ("submission", "starttls", forms[:4]),
        ("smtps", "tls", forms[:4]),
    ]
    for service, mode, chosen in services:
        port = target.ports.get(service)
        label = f"relay{tag}/{service}-{family}" + ("" if mode != "starttls" else "-starttls")
        if port is None or not ports.open(address, port):
            for name, _, _ in chosen:
                yield Result(f"{label}/{name}", CLOSED, f"port {port} closed on {address}")
            continue
        answers = relay_batch(address, port, mode, chosen)
        for _ in range(TEMPORARY_RETRIES):
            again = [f for f in chosen if _temporary(answers.get(f[0]))]
            if not again:
                break
            time.sleep(TEMPORARY_PAUSE)
            answers.update(relay_batch(address, port, mode, again))
        for name, _, rcpt in chosen:
            answer = answers.get(name, "no answer")
            if isinstance(answer, Reply):
                verdict = ACCEPTED if answer.code // 100 == 2 else REFUSED
                yield Result(f"{label}/{name}", verdict, f"<{rcpt}> {answer.text}")
            else:
                yield Result(f"{label}/{name}", REFUSED, f"<{rcpt}> {answer}")


def _temporary(answer: Reply | str | None) -> bool:
    return isinstance(answer, Reply) and answer.code // 100 == 4


# --- (b) AUTH before TLS ---------------------------------------------------------------------


PROBE_PASSWORD = "attack-surface-wrong-password"  # noqa: S105 - deliberately wrong

# SMTP replies that refuse AUTH itself (not the credentials): not offered, TLS first, unknown.
SMTP_AUTH_REFUSALS = {500, 502, 503, 504, 530, 538}
# IMAP/POP3 words of a refusal because the link is not encrypted (Dovecot, RFC 3501/2595).
CLEARTEXT_REFUSAL = re.compile(
    r"PRIVACYREQUIRED|LOGINDISABLED|disallowed|SSL/TLS|STARTTLS|STLS|encrypt|"
    r"Unsupported authentication mechanism|Unknown command",
    re.IGNORECASE,
)


def _plain_credentials(target: Target) -> str:
    # A mailbox that does not exist: a wrong guess never locks out a real user.
    token = f"\0attack-probe@{target.domain}\0{PROBE_PASSWORD}".encode()
    return base64.b64encode(token).decode()


def smtp_auth_probes(target: Target, ports: Ports, address: str, family: str) -> Iterator[Result]:
    for service in ("smtp", "submission"):
        port = target.ports.get(service)
        label = f"auth-before-tls/{service}-{family}"
        names = ("ehlo-offers-auth", "auth-plain", "auth-login")
        if port is None or not ports.open(address, port):
            for name in names:
                yield Result(f"{label}/{name}", CLOSED, f"port {port} closed on {address}")
            continue
        try:
            with Smtp(address, port) as smtp:
                greeting = smtp.reply()
                ehlo = smtp.command(f"EHLO {HELO}")
                if greeting.code != 220 or ehlo.code != 250:
                    reply = (ehlo if greeting.code == 220 else greeting).text
                    for name in names:
                        yield Result(f"{label}/{name}", REFUSED, reply)
                    continue
                auth = [line for line in ehlo.lines[1:] if line.upper().startswith("AUTH")]
                yield Result(
                    f"{label}/ehlo-offers-auth",
                    ACCEPTED if auth else REFUSED,
                    sanitized(auth[0]) if auth else "EHLO offers no AUTH before STARTTLS",
                )
                plain = smtp.command(f"AUTH PLAIN {_plain_credentials(target)}")
                verdict = REFUSED if plain.code in SMTP_AUTH_REFUSALS else ACCEPTED
                yield Result(f"{label}/auth-plain", verdict, plain.text)
                login = smtp.command("AUTH LOGIN")
                verdict = REFUSED if login.code in SMTP_AUTH_REFUSALS else ACCEPTED
                if login.code == 334:
                    smtp.command("*")  # cancel: no password is sent
                yield Result(f"{label}/auth-login", verdict, login.text)
        except (OSError, ProbeError) as exc:
            yield Result(f"{label}/session", REFUSED, sanitized(str(exc)))


def mx_auth_probe(target: Target, ports: Ports, address: str, family: str) -> Iterator[Result]:
    """Port 25 is for other servers' mail: even inside TLS it takes no passwords to guess."""
    port = target.ports.get("smtp")
    label = f"auth-on-mx/smtp-{family}/offered-after-starttls"
    if port is None or not ports.open(address, port):
        yield Result(label, CLOSED, f"port {port} closed on {address}")
        return
    try:
        with open_smtp(address, port, "plain") as smtp:
            ehlo = smtp.starttls()
    except (OSError, ProbeError) as exc:
        # No TLS session, so nothing learnt: a broken STARTTLS must not pass as "refused".
        yield Result(label, UNTESTED, f"cannot test: {sanitized(str(exc))}")
        return
    auth = [line for line in ehlo.lines[1:] if line.upper().startswith("AUTH")]
    if auth:
        yield Result(label, ACCEPTED, f"EHLO after STARTTLS on {port}: {sanitized(auth[0])}")
    else:
        yield Result(label, REFUSED, f"EHLO after STARTTLS on {port} offers no AUTH")


class Imap(Conversation):
    def tagged(self, tag: str) -> tuple[str, list[str]]:
        """Lines up to the tagged one: (tagged line, the lines before it)."""
        before: list[str] = []
        for _ in range(200):
            text = self.line().decode("utf-8", "replace")
            if text.startswith(f"{tag} "):
                return text, before
            if text.startswith("+"):
                return text, before  # a continuation request waits for us
            if text.startswith("* BYE"):
                raise ProbeError(f"server said {sanitized(text)}")
            before.append(text)
        raise ProbeError("endless IMAP response")


def imap_auth_probes(target: Target, ports: Ports, address: str, family: str) -> Iterator[Result]:
    port = target.ports.get("imap")
    label = f"auth-before-tls/imap-{family}"
    if port is None or not ports.open(address, port):
        for name in ("login", "authenticate-plain"):
            yield Result(f"{label}/{name}", CLOSED, f"port {port} closed on {address}")
        return
    attempts = [
        ("login", f'a1 LOGIN "attack-probe@{target.domain}" "{PROBE_PASSWORD}"', "a1"),
        ("authenticate-plain", f"a2 AUTHENTICATE PLAIN {_plain_credentials(target)}", "a2"),
    ]
    for name, command, tag in attempts:
        try:
            with Imap(address, port) as imap:
                imap.line()  # greeting
                imap.send(command.encode() + b"\r\n")
                reply, _ = imap.tagged(tag)
                if reply.startswith("+"):
                    imap.send(b"*\r\n")  # cancel; a challenge already means "go ahead"
                    yield Result(f"{label}/{name}", ACCEPTED, sanitized(reply))
                    continue
                status = reply.split(" ", 2)[1:2]
                refused = status == ["BAD"] or bool(CLEARTEXT_REFUSAL.search(reply))
                yield Result(f"{label}/{name}", REFUSED if refused else ACCEPTED, sanitized(reply))
        except (OSError, ProbeError) as exc:
            yield Result(f"{label}/{name}", REFUSED, sanitized(str(exc)))


def pop3_auth_probes(target: Target, ports: Ports, address: str, family: str) -> Iterator[Result]:
    port = target.ports.get("pop3")
    label = f"auth-before-tls/pop3-{family}"
    if port is None or not ports.open(address, port):
        for name in ("user-pass", "auth-plain"):
            yield Result(f"{label}/{name}", CLOSED, f"port {port} closed on {address}")
        return
    try:
        with Conversation(address, port) as pop:
            pop.line()
            pop.send(f"USER attack-probe@{target.domain}\r\n".encode())
            user = pop.line().decode("utf-8", "replace")
            if user.startswith("+OK"):
                pop.send(f"PASS {PROBE_PASSWORD}\r\n".encode())
                reply = pop.line().decode("utf-8", "replace")
            else:
                reply = user
            refused = reply.startswith("-ERR") and bool(CLEARTEXT_REFUSAL.search(reply))
            yield Result(f"{label}/user-pass", REFUSED if refused else ACCEPTED, sanitized(reply))
    except (OSError, ProbeError) as exc:
        yield Result(f"{label}/user-pass", REFUSED, sanitized(str(exc)))
    try:
        with Conversation(address, port) as pop:
            pop.line()
            pop.send(f"AUTH PLAIN {_plain_credentials(target)}\r\n".encode())
            reply = pop.line().decode("utf-8", "replace")
            if reply.startswith("+ ") or reply == "+":
                pop.send(b"*\r\n")
                yield Result(f"{label}/auth-plain", ACCEPTED, sanitized(reply))
            else:
                refused = reply.startswith("-ERR") and bool(CLEARTEXT_REFUSAL.search(reply))
                verdict = REFUSED if refused else ACCEPTED
                yield Result(f"{label}/auth-plain", verdict, sanitized(reply))
    except (OSError, ProbeError) as exc:
        yield Result(f"{label}/auth-plain", REFUSED, sanitized(str(exc)))


# --- (c) STARTTLS command injection (CVE-2011-0411 class) ------------------------------------


def smtp_injection(address: str, port: int, injected: str) -> tuple[str, str]:
    """STARTTLS and `injected` in one packet: does the server answer it inside TLS?"""
    with Smtp(address, port) as smtp:
        ehlo = smtp.greet()
        if "STARTTLS" not in ehlo_keywords(ehlo):
            return REFUSED, "STARTTLS not offered"
        smtp.send(f"STARTTLS\r\n{injected}\r\n".encode())
        ready = smtp.reply()
        if ready.code != 220:
            return REFUSED, f"STARTTLS: {ready.text}"
        if smtp.buffer:
            # Answered in the clear before TLS: the handshake will fail on it, nothing injected.
            return REFUSED, f"answered before TLS: {sanitized(smtp.buffer)}"
        try:
            smtp.start_tls()
        except ProbeError as exc:
            return REFUSED, f"injected line read as TLS data, not run: {sanitized(str(exc))}"
        extra = smtp.unrequested()
        if extra:
            return ACCEPTED, f"answered inside TLS without being asked: {sanitized(extra)}"
        # A swallowed MAIL FROM would show now as a nested MAIL.
        try:
            smtp.greet_again()
            again = smtp.command(f"MAIL FROM:<{ATTACKER}>")
        except ProbeError as exc:
            return REFUSED, f"nothing answered inside TLS; then {sanitized(str(exc))}"
        if again.code == 503 and "nested" in again.text.lower():
            return ACCEPTED, f"injected MAIL was executed: {again.text}"
        return REFUSED, f"nothing answered inside TLS (then MAIL: {again.text})"


def line_injection(
    address: str, port: int, kind: str, starttls: bytes, injected: bytes
) -> tuple[str, str]:
    """The IMAP (a STARTTLS / b CAPABILITY) or POP3 (STLS / CAPA) equivalent."""
    conv = Imap(address, port)
    with conv:
        conv.line()
        conv.send(starttls + injected)
        if kind == "imap":
            reply, _ = conv.tagged("a")
            ok = reply.startswith("a OK")
        else:
            reply = conv.line().decode("utf-8", "replace")
            ok = reply.startswith("+OK")
        if not ok:
            return REFUSED, f"STARTTLS: {sanitized(reply)}"
        if conv.buffer:
            return REFUSED, f"answered before TLS: {sanitized(conv.buffer)}"
        try:
            conv.start_tls()
        except ProbeError as exc:
            # The injected line was taken as the first TLS bytes, not run as a command.
            return REFUSED, f"injected line read as TLS data, not run: {sanitized(str(exc))}"
        extra = conv.unrequested()
        if extra:
            return ACCEPTED, f"answered inside TLS without being asked: {sanitized(extra)}"
        return REFUSED, "nothing answered inside TLS"


def injection_probes(target: Target, ports: Ports, address: str, family: str) -> Iterator[Result]:
    cases: list[tuple[str, str, Callable[[int], tuple[str, str]]]] = []
    for service in ("smtp", "submission"):
        for name, injected in (("rset", "RSET"), ("mail-from", f"MAIL FROM:<{ATTACKER}>")):

            def smtp_case(port: int, injected: str = injected) -> tuple[str, str]:
                return smtp_injection(address, port, injected)

            cases.append((service, name, smtp_case))

    def imap_case(port: int) -> tuple[str, str]:
        return line_injection(address, port, "imap", b"a STARTTLS\r\n", b"b CAPABILITY\r\n")

    def pop3_case(port: int) -> tuple[str, str]:
        return line_injection(address, port, "pop3", b"STLS\r\n", b"CAPA\r\n")

    cases += [("imap", "capability", imap_case), ("pop3", "capa", pop3_case)]
    for service, name, run in cases:
        port = target.ports.get(service)
        label = f"starttls-injection/{service}-{family}/{name}"
        if port is None or not ports.open(address, port):
            yield Result(label, CLOSED, f"port {port} closed on {address}")
            continue
        try:
            verdict, reply = run(port)
        except (OSError, ProbeError) as exc:
            verdict, reply = REFUSED, sanitized(str(exc))
        yield Result(label, verdict, reply)


# --- (d) SMTP smuggling ----------------------------------------------------------------------


SMUGGLING_ENDINGS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CR": b"\r.\r",
    "CRLF.CR": b"\r\n.\r",
    "CR.CRLF": b"\r.\r\n",
}


@dataclass
class Smuggled:
    name: str
    outer: str  # marker only in the outer message
    inner: str  # marker of the smuggled message (also inside the outer one when not split)
    verdict: str = UNTESTED
    reply: str = ""
    delivered_outer: bool = False
    extra: list[str] = field(default_factory=list)


def _rcpt_until_accepted(smtp: Smtp, rcpt: str) -> Reply:
    """RCPT to our own mailbox; a 4xx (mailbox probe in progress) is asked again a few times."""
    reply = smtp.command(f"RCPT TO:<{rcpt}>")
    for _ in range(TEMPORARY_RETRIES * 2):
        if reply.code // 100 != 4:
            break
        time.sleep(TEMPORARY_PAUSE)
        reply = smtp.command(f"RCPT TO:<{rcpt}>")
    return reply


def smuggle(target: Target, address: str, port: int, case: Smuggled, ending: bytes) -> None:
    mailbox = target.mailbox
    with open_smtp(address, port, "plain") as smtp:
        mail = smtp.command(f"MAIL FROM:<{ATTACKER}>")
        if mail.code != 250:
            case.reply = f"MAIL refused, cannot test: {mail.text}"
            return
        rcpt = _rcpt_until_accepted(smtp, mailbox)
        if rcpt.code // 100 != 2:
            case.reply = f"RCPT <{mailbox}> refused, cannot test: {rcpt.text}"
            return
        data = smtp.command("DATA")
        if data.code != 354:
            case.reply = f"DATA refused, cannot test: {data.text}"
            return
        message_id = f"<{case.outer}@{OUTSIDE}>"
        outer = (
            f"From: <{ATTACKER}>\r\nTo: <{mailbox}>\r\nSubject: attack-surface {case.outer}\r\n"
            f"Message-ID: {message_id}\r\n\r\nouter message {case.outer}"
        ).encode()
        inner = (
            f"MAIL FROM:<{ATTACKER}>\r\nRCPT TO:<{mailbox}>\r\nDATA\r\n"
            f"From: <postmaster@{target.domain}>\r\nTo: <{mailbox}>\r\n"
            f"Subject: smuggled {case.inner}\r\n\r\nsmuggled message {case.inner}\r\n.\r\n"
        ).encode()
        smtp.send(outer + ending + inner)
        replies: list[str] = []
        try:
            replies.append(smtp.reply().text)
            # More replies mean the smuggled commands were read as commands.
            deadline = time.monotonic() + QUIET_WAIT * 2
            while time.monotonic() < deadline and len(replies) < 10:
                replies.append(smtp.reply(max(0.1, deadline - time.monotonic())).text)
        except ProbeError as exc:
            if not replies:
                case.verdict, case.reply = REFUSED, sanitized(str(exc))
                return
        if len(replies) > 1:
            case.verdict = ACCEPTED
            case.reply = "smuggled commands answered: " + " | ".join(replies)
        else:
            case.verdict = REFUSED
            case.reply = f"one message: {replies[0]}"
            case.delivered_outer = replies[0].startswith("250")
        with suppress(ProbeError):
            smtp.command("QUIT")


def _maildir_files(root: Path, since: float) -> Iterator[Path]:
    count = 0
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            count += 1
            if count > 100_000:
                return
            try:
                info = path.stat()
            except OSError:
                continue
            if info.st_mtime >= since - 60 and info.st_size <= MAX_READ:
                yield path


def check_mailbox(target: Target, cases: Sequence[Smuggled], since: float) -> str | None:
    """Look for smuggled messages delivered on their own; None when the mailbox is unreadable."""
    if target.mail_root is None:
        return None
    maildir = target.mail_root / target.domain / target.user / "Maildir"
    if not os.access(maildir, os.R_OK | os.X_OK):
        return f"{maildir} not readable: Maildir not checked"
    deadline = time.monotonic() + DELIVERY_WAIT
    split: set[str] = set()
    while True:
        found_outer: set[str] = set()
        for path in _maildir_files(maildir, since):
            try:
                content = path.read_bytes().decode("utf-8", "replace")
            except OSError:
                continue
            for case in cases:
                if case.outer in content:
                    found_outer.add(case.name)
                elif case.inner in content and case.name not in split:
                    # Only the smuggled message, without the outer one around it.
                    split.add(case.name)
                    evidence = f"smuggled message delivered on its own: {path.name}"
                    if case.verdict == ACCEPTED:
                        case.reply += f"; {evidence}"
                    else:
                        case.verdict, case.reply = ACCEPTED, evidence
        waiting = [c for c in cases if c.delivered_outer and c.name not in found_outer]
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    for case in waiting:
        case.reply += f" (not in {maildir} after {DELIVERY_WAIT:.0f}s)"
    for case in cases:
        if case.name in found_outer and case.verdict == REFUSED:
            case.reply += "; delivered whole, smuggled part inside its body"
    return ""


def smuggling_probes(target: Target, ports: Ports, address: str, family: str) -> Iterator[Result]:
    port = target.ports.get("smtp")
    label = f"smuggling/smtp-{family}"
    if port is None or not ports.open(address, port):
        for name in SMUGGLING_ENDINGS:
            yield Result(f"{label}/{name}", CLOSED, f"port {port} closed on {address}")
        return
    run = uuid.uuid4().hex[:10]
    since = time.time()
    cases = [
        Smuggled(name, f"PWOUTER-{run}-{i}", f"PWSMUGGLED-{run}-{i}")
        for i, name in enumerate(SMUGGLING_ENDINGS)
    ]
    for case in cases:
        try:
            smuggle(target, address, port, case, SMUGGLING_ENDINGS[case.name])
        except (OSError, ProbeError) as exc:
            if case.verdict == UNTESTED:
                case.reply = f"cannot test: {sanitized(str(exc))}"
    note = check_mailbox(target, [c for c in cases if c.verdict != UNTESTED], since)
    for case in cases:
        reply = case.reply if note is None or not note else f"{case.reply}; {note}"
        yield Result(f"{label}/{case.name}", case.verdict, reply)


# --- inside the namespace: run the probe groups ----------------------------------------------


GROUPS = ("relay", "injection", "smuggling", "auth")


def run_groups(target: Target, groups: Sequence[str], tag: str) -> Iterator[Result]:
    ports = Ports()
    families = (("v4", target.v4), ("v6", target.v6))
    for group in groups:
        for family, address in families:
            if group == "relay":
                yield from relay_probes(target, ports, tag, address, family)
            elif group == "injection":
                yield from injection_probes(target, ports, address, family)
            elif group == "smuggling" and family == "v4":
                yield from smuggling_probes(target, ports, address, family)
            elif group == "auth":
                yield from smtp_auth_probes(target, ports, address, family)
                yield from mx_auth_probe(target, ports, address, family)
                yield from imap_auth_probes(target, ports, address, family)
                yield from pop3_auth_probes(target, ports, address, family)


def inside(target: Target, groups: Sequence[str], tag: str) -> int:
    """Child mode: one JSON object per probe on stdout."""
    for result in run_groups(target, groups, tag):
        print(json.dumps(asdict(result)), flush=True)
    return 0


# --- on the host: the namespace, the permitted entries, the report ---------------------------


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=15)
    if done.returncode != 0:
        raise SetupError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _address_in_use(address: str) -> bool:
    done = subprocess.run(
        ["ip", "-o", "addr", "show"], capture_output=True, text=True, check=False, timeout=15
    )
    return re.search(rf"\sinet6? {re.escape(address)}/", done.stdout) is not None


@contextmanager
def attack_namespace() -> Iterator[str]:
    """The namespace joined by a veth pair; both removed at the end, even on failure."""
    for address in (HOST_V4, HOST_V6):
        if _address_in_use(address):
            raise SetupError(f"{address} is already on an interface here: another run?")
    suffix = uuid.uuid4().hex[:8]
    name, host_end, ns_end = f"{NETNS_PREFIX}{suffix}", f"pwa{suffix}h", f"pwa{suffix}n"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        try:
            _ip("link", "set", ns_end, "netns", name)
            _ip("addr", "add", f"{HOST_V4}/24", "dev", host_end)
            _ip("addr", "add", f"{HOST_V6}/64", "dev", host_end, "nodad")
            _ip("link", "set", host_end, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{ATTACKER_V4}/24", "dev", ns_end)
            _ip("-n", name, "addr", "add", f"{ATTACKER_V6}/64", "dev", ns_end, "nodad")
            _ip("-n", name, "link", "set", ns_end, "up")
            yield name
        finally:
            # Deleting one end removes the pair (the namespace end may already be gone).
            subprocess.run(
                ["ip", "link", "delete", host_end],
                capture_output=True,
                check=False,
                timeout=15,
            )
    finally:
        subprocess.run(
            ["ip", "netns", "delete", name], capture_output=True, check=False, timeout=15
        )


def run_inside(namespace: str, argv: list[str], report: Callable[[Result], None]) -> None:
    """This script again inside the namespace; each result reported as it arrives."""
    command = ["ip", "netns", "exec", namespace, sys.executable, str(Path(__file__).resolve())]
    child = subprocess.Popen([*command, *argv], stdout=subprocess.PIPE, text=True)
    # Bounded: a hung probe cannot hold CI; the child is ours, killed by its own handle.
    watchdog = threading.Timer(PHASE_TIMEOUT, child.kill)
    watchdog.start()
    try:
        assert child.stdout is not None
        for line in child.stdout:
            try:
                data = json.loads(line)
                report(Result(str(data["name"]), str(data["verdict"]), str(data["reply"])))
            except (ValueError, KeyError, TypeError):
                print(f"attack surface: unexpected output {sanitized(line)}", file=sys.stderr)
        code = child.wait()
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    if code != 0:
        raise SetupError(f"probe process exited with status {code}")


@contextmanager
def permitted_clients(postwarden: list[str] | None) -> Iterator[None]:
    """The namespace's addresses on the permitted list (past greylisting) while in the block."""
    if postwarden is None:
        yield
        return
    addresses = [ATTACKER_V4, ATTACKER_V6]
    comment = ["--comment", "attack-surface check (removed when it ends)"]
    done = subprocess.run(
        [*postwarden, "lists", "add", "permitted", *addresses, *comment],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise SetupError(f"postwarden lists add permitted: {done.stderr.strip()}")
    try:
        time.sleep(2.0)  # policyd rereads the lists every store.refresh_interval (<= 1 s)
        yield
    finally:
        removed = subprocess.run(
            [*postwarden, "lists", "remove", "permitted", *addresses],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if removed.returncode != 0:
            print(
                f"attack surface: WARNING: could not remove {' '.join(addresses)} from "
                f"the permitted list: {removed.stderr.strip()}",
                file=sys.stderr,
            )


def parse_ports(text: str) -> dict[str, int]:
    ports = dict(DEFAULT_PORTS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in DEFAULT_PORTS or not value.isdigit():
            raise argparse.ArgumentTypeError(f"--ports: {item!r} is not SERVICE=PORT")
        ports[key] = int(value)
    return ports


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--target", default=HOST_V4, help=f"IPv4 address ({HOST_V4})")
    parser.add_argument("--target6", default=HOST_V6, help=f"IPv6 address ({HOST_V6})")
    parser.add_argument("--ports", type=parse_ports, default=dict(DEFAULT_PORTS))
    parser.add_argument("--local-domain", required=True, help="a mailbox domain of the gateway")
    parser.add_argument("--local-user", required=True, help="a mailbox there (local part)")
    parser.add_argument("--mail-root", type=Path, help="Maildirs as DIR/domain/user/Maildir")
    parser.add_argument(
        "--permit-client",
        action="store_true",
        help="put the namespace's addresses on the permitted list for the smuggling probes "
        "and a second relay round (removed afterwards)",
    )
    parser.add_argument(
        "--postwarden",
        default="postwarden",
        help="how to run the postwarden CLI for --permit-client (split like a shell does)",
    )
    parser.add_argument("--inside", help=argparse.SUPPRESS)  # child mode: the groups to run
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "@" in args.local_user:
        args.local_user = args.local_user.split("@", 1)[0]
    return args


def child_argv(args: argparse.Namespace, groups: Sequence[str], tag: str) -> list[str]:
    ports = ",".join(f"{k}={v}" for k, v in args.ports.items())
    argv = ["--target", args.target, "--target6", args.target6, "--ports", ports]
    argv += ["--local-domain", args.local_domain, "--local-user", args.local_user]
    if args.mail_root is not None:
        argv += ["--mail-root", str(args.mail_root)]
    return [*argv, "--inside", ",".join(groups), "--tag", tag]


def _terminated(signum: int, _frame: object) -> None:
    # SIGTERM (CI's timeout) unwinds like Ctrl-C, so the namespace and veth are removed.
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 no attack accepted, 1 some accepted, 2 the check could not run."""
    try:
        return check(argv)
    except KeyboardInterrupt:
        return 2
    except Exception as exc:  # noqa: BLE001 - a crash must read as "could not check" (2), not 1
        print(f"attack surface: setup failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def check(argv: Sequence[str] | None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    target = Target(
        args.target,
        args.target6,
        args.ports,
        args.local_domain.lower(),
        args.local_user,
        args.mail_root,
    )
    if args.inside is not None:
        return inside(target, [g for g in args.inside.split(",") if g in GROUPS], args.tag)
    if (args.target, args.target6) != (HOST_V4, HOST_V6):
        print(
            f"attack surface: the target is this host's end of the veth pair: "
            f"--target {HOST_V4} --target6 {HOST_V6}",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() != 0:
        print("attack surface: run as root (it creates a network namespace)", file=sys.stderr)
        return 2
    results: list[Result] = []

    def report(result: Result) -> None:
        results.append(result)
        print(result.line(), flush=True)

    signal.signal(signal.SIGTERM, _terminated)
    permit = shlex.split(args.postwarden) if args.permit_client else None
    # AUTH last: failed logins may get the attacker's address banned (fail2ban, rate limits).
    phases: list[tuple[list[str], str, bool]] = (
        [(["relay", "injection"], "", False), (["relay", "smuggling"], "+permitted", True)]
        if permit
        else [(["relay", "injection", "smuggling"], "", False)]
    )
    phases.append((["auth"], "", False))
    try:
        with attack_namespace() as namespace:
            for groups, tag, permitted in phases:
                with permitted_clients(permit if permitted else None):
                    run_inside(namespace, child_argv(args, groups, tag), report)
    except SetupError as exc:
        print(f"attack surface: setup failed: {exc}", file=sys.stderr)
        return 2
    accepted = [r for r in results if r.verdict == ACCEPTED]
    closed = sum(r.verdict == CLOSED for r in results)
    untested = [r for r in results if r.verdict == UNTESTED]
    print(
        f"attack surface: {len(results)} probes, {len(accepted)} accepted attacks "
        f"({closed} skipped: port closed; {len(untested)} untested)"
    )
    if accepted:
        return 1
    smtp_closed = any(r.verdict == CLOSED and r.name.startswith("relay/smtp-v4/") for r in results)
    if untested or smtp_closed or not results:
        print("attack surface: setup failure: port 25 closed or probes left untested")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
