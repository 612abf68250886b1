"""`postwarden check backend`: each backend service reached as the gateway reaches it, no login.

For each service of `[gateway]` (smtp, imap, pop3): TCP connect, the greeting, then by its
security: `starttls`: the capability list (SMTP EHLO, IMAP CAPABILITY, POP3 CAPA) must
advertise STARTTLS (POP3: STLS), the command must be acknowledged, then the TLS handshake;
`tls`: the handshake first, then the greeting; `none`: greeting and capabilities only,
reported as "unencrypted (tests only)". The certificate must chain to `gateway.ca` alone and
carry `certificate_name_for(service)` (for an IP host, an IP SAN), which is how Postfix
(`secure`, `match=`) and Dovecot's login proxy check it (docs/gateway-mode.md).

Never sent: anything that carries or starts a login. The only commands are EHLO, STARTTLS,
QUIT (SMTP); CAPABILITY, STARTTLS, LOGOUT (IMAP); CAPA, STLS, QUIT (POP3).

The protocol steps are pure functions on received lines (`smtp_reply`, `imap_tagged`,
`pop3_multiline`, `offers_starttls` …, gathered per protocol in `dialect()`); the socket
I/O is `_Conversation` alone, and `check_service` runs the steps.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from postwarden.config.gateway import GatewayConfig, Security, ServiceName

# Seconds for the connect and for each answer awaited.
DEFAULT_TIMEOUT = 10.0
# One service's whole conversation: a backend that trickles bytes cannot hold the check longer.
SERVICE_DEADLINE = 30.0
# Far above any real reply line (SMTP's limit is 512; IMAP capability lines run to ~1000).
MAX_LINE = 8192
MAX_REPLY_LINES = 200


class BackendCheckError(Exception):
    """The check cannot run (gateway mode off, gateway.ca or the client certificate unusable)."""


class BackendProtocolError(Exception):
    """The backend answered something that is not its protocol, or too much of it."""


class Verdict(StrEnum):
    VERIFIED = "verified"
    UNENCRYPTED = "unencrypted"
    UNREACHABLE = "unreachable"
    NO_ANSWER = "no_answer"
    BAD_GREETING = "bad_greeting"
    PROTOCOL_ERROR = "protocol_error"
    STARTTLS_NOT_OFFERED = "starttls_not_offered"
    STARTTLS_REFUSED = "starttls_refused"
    TLS_FAILED = "tls_failed"
    UNTRUSTED = "untrusted"
    WRONG_NAME = "wrong_name"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    CERTIFICATE_REJECTED = "certificate_rejected"


PASSING = frozenset({Verdict.VERIFIED, Verdict.UNENCRYPTED})

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h), as ssl.SSLCertVerificationError.verify_code.
_VERIFY_CODES: dict[int, Verdict] = {
    2: Verdict.UNTRUSTED,  # UNABLE_TO_GET_ISSUER_CERT
    9: Verdict.NOT_YET_VALID,  # CERT_NOT_YET_VALID
    10: Verdict.EXPIRED,  # CERT_HAS_EXPIRED
    18: Verdict.UNTRUSTED,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: Verdict.UNTRUSTED,  # SELF_SIGNED_CERT_IN_CHAIN
    20: Verdict.UNTRUSTED,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: Verdict.UNTRUSTED,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    62: Verdict.WRONG_NAME,  # HOSTNAME_MISMATCH
    64: Verdict.WRONG_NAME,  # IP_ADDRESS_MISMATCH
}


def certificate_verdict(verify_code: int) -> Verdict:
    """What an OpenSSL verification error means for the operator."""
    return _VERIFY_CODES.get(verify_code, Verdict.CERTIFICATE_REJECTED)


# --- lines and replies (pure) -------------------------------------------------------------


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """The backend's words made safe for a terminal and a log: control characters escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class LineBuffer:
    """Bytes in, complete lines out (CRLF or bare LF), a partial line kept for the next feed.

    The lines are the backend's untrusted words: decoded leniently, control characters
    escaped (`printable`), so that they can be shown as they are."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > MAX_LINE or any(len(line) > MAX_LINE for line in lines):
            raise BackendProtocolError(f"a line longer than {MAX_LINE} bytes")
        return [printable(line.rstrip(b"\r").decode("utf-8", errors="replace")) for line in lines]

    @property
    def pending(self) -> bytes:
        return self._pending


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete reply: whether it is the answer the step wants, its lines, and the line
    that says so (SMTP's last, IMAP's tagged, POP3's status line)."""

    ok: bool
    lines: tuple[str, ...]
    summary: str


_SMTP_LINE = re.compile(r"^(\d{3})([ -]|$)")


def smtp_reply(lines: Sequence[str], expect: int) -> Reply | None:
    """An SMTP reply (`250-…` lines, then `250 …`; RFC 5321 4.2.1) once complete."""
    for i, line in enumerate(lines):
        match = _SMTP_LINE.match(line)
        if match is None:
            raise BackendProtocolError(f"not an SMTP reply: {line!r}")
        if match.group(2) != "-":
            return Reply(int(match.group(1)) == expect, tuple(lines[: i + 1]), line)
    return None


def smtp_offers_starttls(ehlo: Reply) -> bool:
    """STARTTLS among the EHLO keywords (every line but the first, which names the server)."""
    return any(line[4:].split()[:1] == ["STARTTLS"] for line in (x.upper() for x in ehlo.lines[1:]))


def imap_greeting(lines: Sequence[str]) -> Reply | None:
    """The untagged greeting; `* OK` is the one that lets a client go on (RFC 9051 7.1)."""
    if not lines:
        return None
    first = lines[0]
    if not first.startswith("* "):
        raise BackendProtocolError(f"not an IMAP greeting: {first!r}")
    return Reply(first[2:].split(" ", 1)[0].upper() == "OK", (first,), first)


def imap_tagged(lines: Sequence[str], tag: str) -> Reply | None:
    """Untagged lines up to and including the one tagged `tag`; ok when that says OK."""
    for i, line in enumerate(lines):
        if line.startswith(f"{tag} "):
            status = line[len(tag) + 1 :].split(" ", 1)[0].upper()
            return Reply(status == "OK", tuple(lines[: i + 1]), line)
        if not line.startswith("* "):
            raise BackendProtocolError(f"not an IMAP response to {tag}: {line!r}")
    return None


def imap_capabilities(reply: Reply) -> set[str]:
    """Capabilities from `* CAPABILITY …` lines and `[CAPABILITY …]` response codes."""
    found: set[str] = set()
    for line in reply.lines:
        words = line.split()
        if len(words) > 1 and words[0] == "*" and words[1].upper() == "CAPABILITY":
            found.update(word.upper() for word in words[2:])
        for code in re.findall(r"\[CAPABILITY ([^\]]*)\]", line, flags=re.IGNORECASE):
            found.update(word.upper() for word in code.split())
    return found


def imap_offers_starttls(capability: Reply) -> bool:
    return "STARTTLS" in imap_capabilities(capability)


def pop3_status(lines: Sequence[str]) -> Reply | None:
    """A one-line POP3 answer: `+OK …` or `-ERR …` (RFC 1939 3)."""
    if not lines:
        return None
    first = lines[0]
    if first.startswith("+OK"):
        return Reply(True, (first,), first)
    if first.startswith("-ERR"):
        return Reply(False, (first,), first)
    raise BackendProtocolError(f"not a POP3 answer: {first!r}")


def pop3_multiline(lines: Sequence[str]) -> Reply | None:
    """A multi-line POP3 answer (`+OK`, lines, `.`), or its `-ERR` line."""
    status = pop3_status(lines)
    if status is None or not status.ok:
        return status
    for i, line in enumerate(lines):
        if i > 0 and line == ".":
            return Reply(True, tuple(lines[: i + 1]), lines[0])
    return None


def pop3_offers_stls(capa: Reply) -> bool:
    """STLS among CAPA's capability lines (RFC 2595 4)."""
    return any(line.split()[:1] == ["STLS"] for line in (x.upper() for x in capa.lines[1:-1]))


@dataclass(frozen=True, slots=True)
class Dialect:
    """One protocol's steps: the commands this check sends and how each answer reads."""

    greeting: Callable[[Sequence[str]], Reply | None]
    capabilities_command: str
    capabilities_verb: str  # the command without its tag, for the report
    capabilities: Callable[[Sequence[str]], Reply | None]
    offers_starttls: Callable[[Reply], bool]
    starttls_command: str
    starttls: Callable[[Sequence[str]], Reply | None]
    # Asked again over TLS (SMTP must: RFC 3207 4.2); its answer proves the backend accepted
    # the session (TLS 1.3 servers refuse a client certificate only after the handshake).
    tls_capabilities_command: str
    tls_capabilities: Callable[[Sequence[str]], Reply | None]
    quit_command: str
    starttls_word: str  # the capability's name: STARTTLS, or STLS in POP3


def dialect(service: ServiceName, helo: str) -> Dialect:
    """The steps for one service; `helo` is the name the gateway gives in EHLO."""
    if service == "smtp":
        return Dialect(
            greeting=partial(smtp_reply, expect=220),
            capabilities_command=f"EHLO {helo}",
            capabilities_verb="EHLO",
            capabilities=partial(smtp_reply, expect=250),
            offers_starttls=smtp_offers_starttls,
            starttls_command="STARTTLS",
            starttls=partial(smtp_reply, expect=220),
            tls_capabilities_command=f"EHLO {helo}",
            tls_capabilities=partial(smtp_reply, expect=250),
            quit_command="QUIT",
            starttls_word="STARTTLS",
        )
    if service == "imap":
        return Dialect(
            greeting=imap_greeting,
            capabilities_command="c1 CAPABILITY",
            capabilities_verb="CAPABILITY",
            capabilities=partial(imap_tagged, tag="c1"),
            offers_starttls=imap_offers_starttls,
            starttls_command="c2 STARTTLS",
            starttls=partial(imap_tagged, tag="c2"),
            tls_capabilities_command="c3 CAPABILITY",
            tls_capabilities=partial(imap_tagged, tag="c3"),
            quit_command="c4 LOGOUT",
            starttls_word="STARTTLS",
        )
    return Dialect(
        greeting=pop3_status,
        capabilities_command="CAPA",
        capabilities_verb="CAPA",
        capabilities=pop3_multiline,
        offers_starttls=pop3_offers_stls,
        starttls_command="STLS",
        starttls=pop3_status,
        tls_capabilities_command="CAPA",
        tls_capabilities=pop3_multiline,
        quit_command="QUIT",
        starttls_word="STLS",
    )


# --- what was found ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """The backend's certificate as the report shows it."""

    names: tuple[str, ...]  # subjectAltName DNS and IP entries (the CN when there is none)
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: str

    @classmethod
    def from_der(cls, der: bytes) -> CertificateFacts:
        cert = x509.load_der_x509_certificate(der)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [
                *san.get_values_for_type(x509.DNSName),
                *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
            ]
        except x509.ExtensionNotFound:
            names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        return cls(
            names=tuple(printable(name) for name in names),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            issuer=printable(cert.issuer.rfc4514_string()),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "issuer": self.issuer,
        }


def _utc(moment: dt.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


@dataclass(frozen=True, slots=True)
class ServiceCheck:
    """One backend service's verdict and what was seen on the way to it."""

    service: ServiceName
    host: str
    port: int
    security: Security
    expected_name: str | None  # the name the certificate must carry (None: unencrypted)
    verdict: Verdict
    found: str
    greeting: str | None = None
    starttls_offered: bool | None = None  # None: not asked (implicit TLS) or not reached
    tls_version: str | None = None
    cipher: str | None = None
    certificate: CertificateFacts | None = None
    client_certificate: bool = False  # the gateway's client certificate was offered

    @property
    def passed(self) -> bool:
        return self.verdict in PASSING

    @property
    def warning(self) -> str | None:
        if self.verdict is not Verdict.UNENCRYPTED:
            return None
        return (
            "unencrypted (tests only): logins and mail to this service cross the network in clear"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "check": self.service,
            "passed": self.passed,
            "verdict": str(self.verdict),
            "found": self.found,
            "warning": self.warning,
            "host": self.host,
            "port": self.port,
            "security": self.security,
            "expected_name": self.expected_name,
            "greeting": self.greeting,
            "starttls_offered": self.starttls_offered,
            "tls": None
            if self.tls_version is None
            else {"version": self.tls_version, "cipher": self.cipher},
            "certificate": None if self.certificate is None else self.certificate.as_json(),
            "client_certificate": self.client_certificate,
        }

    def lines(self) -> list[str]:
        mark = "FAIL" if not self.passed else "warn" if self.warning else "pass"
        out = [
            f"  [{mark}] {self.service:<4} {self.host}:{self.port} ({self.security})  {self.found}"
        ]
        if self.greeting is not None:
            out.append(f"         greeting: {self.greeting}")
        if self.tls_version is not None:
            client = ", client certificate offered" if self.client_certificate else ""
            out.append(f"         TLS: {self.tls_version}, {self.cipher}{client}")
        if self.certificate is not None:
            cert = self.certificate
            out.append(
                f"         certificate: {', '.join(cert.names) or '(no names)'}; "
                f"expires {_utc(cert.not_after)}; issuer {cert.issuer}"
            )
        return out


@dataclass(frozen=True, slots=True)
class BackendReport:
    ca: Path | None
    checks: tuple[ServiceCheck, ...]

    @property
    def all_passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "ca": None if self.ca is None else str(self.ca),
            "passed": self.all_passed,
            "checks": [c.as_json() for c in self.checks],
        }

    def lines(self) -> list[str]:
        out = ["Backend services" + (f" (gateway.ca {self.ca})" if self.ca else "")]
        for check in self.checks:
            out.extend(check.lines())
        failed = sum(not c.passed for c in self.checks)
        warned = sum(c.warning is not None for c in self.checks)
        out.append(
            f"{len(self.checks)} service(s): {len(self.checks) - failed - warned} verified, "
            f"{warned} unencrypted, {failed} failed"
        )
        return out


# --- TLS contexts ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """`verifying`: gateway.ca alone, name checked; `inspecting`: the same without checks,
    used only after a rejection, to show the operator the certificate that was rejected."""

    verifying: ssl.SSLContext
    inspecting: ssl.SSLContext
    client_certificate: bool


def tls_contexts(ca: Path, client_cert: tuple[Path, Path] | None = None) -> TlsContexts:
    """The contexts for one service; an unreadable CA or client certificate is BackendCheckError."""
    try:
        # cafile given: Python loads no system CA, as Postfix (tls_append_default_CA = no).
        verifying = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise BackendCheckError(f"gateway.ca = {ca}: not a readable PEM CA file: {exc}") from None
    inspecting = ssl.create_default_context()
    inspecting.check_hostname = False
    inspecting.verify_mode = ssl.CERT_NONE
    if client_cert is not None:
        cert, key = client_cert
        for context in (verifying, inspecting):
            try:
                context.load_cert_chain(str(cert), str(key))
            except (OSError, ssl.SSLError) as exc:
                raise BackendCheckError(
                    f"gateway.client_cert = {cert}, gateway.client_key = {key}: "
                    f"cannot be loaded: {exc}"
                ) from None
    return TlsContexts(verifying, inspecting, client_cert is not None)


# --- the conversation (the only socket I/O) ----------------------------------------------


class _Stop(Exception):
    """The conversation ended before a TLS session was set up; the verdict says why."""

    def __init__(self, verdict: Verdict, found: str) -> None:
        super().__init__(found)
        self.verdict = verdict
        self.found = found


class _Conversation:
    """One TCP connection: send a command line, read one reply, switch to TLS."""

    def __init__(self, sock: socket.socket, timeout: float, deadline: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._deadline = deadline
        self._buffer = LineBuffer()
        self._lines: list[str] = []

    def _arm(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self._sock.settimeout(min(self._timeout, remaining))

    def send(self, command: str) -> None:
        self._arm()
        self._sock.sendall(command.encode("ascii") + b"\r\n")

    def reply(self, parse: Callable[[Sequence[str]], Reply | None]) -> Reply:
        while True:
            answer = parse(self._lines)
            if answer is not None:
                del self._lines[: len(answer.lines)]
                return answer
            if len(self._lines) > MAX_REPLY_LINES:
                raise BackendProtocolError(f"a reply of more than {MAX_REPLY_LINES} lines")
            self._arm()
            data = self._sock.recv(4096)
            if not data:
                raise BackendProtocolError("the backend closed the connection")
            self._lines.extend(self._buffer.feed(data))

    @property
    def has_unread(self) -> bool:
        return bool(self._lines or self._buffer.pending)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> ssl.SSLSocket:
        self._arm()
        tls = context.wrap_socket(self._sock, server_hostname=server_hostname)
        self._sock = tls
        return tls

    def goodbye(self, command: str) -> None:
        """QUIT/LOGOUT and its answer, so the backend logs a clean end; its failure is moot."""
        try:
            self.send(command)
            self._arm()
            self._sock.recv(4096)
        except (OSError, BackendProtocolError):
            pass

    def close(self) -> None:
        self._sock.close()


@dataclass
class _Seen:
    """Filled in as the conversation goes, so a verdict at any step keeps what came before."""

    greeting: str | None = None
    starttls_offered: bool | None = None
    tls_version: str | None = None
    cipher: str | None = None
    certificate_der: bytes | None = None
    rejection: ssl.SSLCertVerificationError | None = None


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        raise _Stop(
            Verdict.UNREACHABLE, f"unreachable: {host} does not resolve ({exc.strerror})"
        ) from None
    except ConnectionRefusedError:
        raise _Stop(Verdict.UNREACHABLE, "unreachable: connection refused") from None
    except TimeoutError:
        raise _Stop(
            Verdict.UNREACHABLE, f"unreachable: connection timed out after {timeout:g} s"
        ) from None
    except OSError as exc:
        raise _Stop(Verdict.UNREACHABLE, f"unreachable: {exc.strerror or exc}") from None


def _converse(
    host: str,
    port: int,
    security: Security,
    steps: Dialect,
    context: ssl.SSLContext | None,
    server_hostname: str,
    timeout: float,
    seen: _Seen,
) -> None:
    """Greeting, capabilities, STARTTLS, handshake and the capabilities again over TLS, as
    `security` says; _Stop where it ends short of a working TLS session (for `none`: of the
    capabilities)."""
    sock = _connect(host, port, timeout)
    talk = _Conversation(sock, timeout, time.monotonic() + SERVICE_DEADLINE)
    step = "TLS handshake" if security == "tls" else "greeting"
    try:
        if security == "tls":
            assert context is not None
            _handshake(talk, context, server_hostname, seen)
            step = "greeting"
        greeting = talk.reply(steps.greeting)
        seen.greeting = greeting.summary
        if not greeting.ok:
            raise _Stop(
                Verdict.BAD_GREETING, f"the backend refuses the session: {greeting.summary}"
            )
        verb = steps.capabilities_verb
        if security != "tls":
            step = f"answer to {verb}"
            talk.send(steps.capabilities_command)
            capabilities = talk.reply(steps.capabilities)
            seen.starttls_offered = capabilities.ok and steps.offers_starttls(capabilities)
        if security == "starttls":
            if not seen.starttls_offered:
                raise _Stop(
                    Verdict.STARTTLS_NOT_OFFERED,
                    f"{steps.starttls_word} not offered (the answer to {verb} does not list it): "
                    "enforced STARTTLS fails here",
                )
            step = f"answer to {steps.starttls_word}"
            talk.send(steps.starttls_command)
            answer = talk.reply(steps.starttls)
            if not answer.ok:
                raise _Stop(
                    Verdict.STARTTLS_REFUSED,
                    f"{steps.starttls_word} refused: {answer.summary}",
                )
            if talk.has_unread:
                # Bytes before the handshake would be read as if they came over TLS.
                raise _Stop(
                    Verdict.PROTOCOL_ERROR,
                    f"the backend sent more after accepting {steps.starttls_word}, "
                    "before the TLS handshake",
                )
            step = "TLS handshake"
            assert context is not None
            _handshake(talk, context, server_hostname, seen)
            step = f"answer to {verb} over TLS"
            talk.send(steps.tls_capabilities_command)
            talk.reply(steps.tls_capabilities)
        talk.goodbye(steps.quit_command)
    except TimeoutError:
        raise _Stop(Verdict.NO_ANSWER, f"no {step} within {timeout:g} s") from None
    except BackendProtocolError as exc:
        raise _Stop(Verdict.PROTOCOL_ERROR, f"{step}: {exc}") from None
    except ssl.SSLError as exc:  # after the handshake: those in it are caught in _handshake
        reason = _reason(exc)
        hint = (
            " (it wants a client certificate: gateway.client_cert, SMTP only)"
            if "CERTIFICATE_REQUIRED" in reason
            else ""
        )
        raise _Stop(
            Verdict.TLS_FAILED, f"the backend ended the TLS session at the {step}: {reason}{hint}"
        ) from None
    except OSError as exc:
        raise _Stop(Verdict.PROTOCOL_ERROR, f"{step}: connection lost: {exc}") from None
    finally:
        talk.close()


def _reason(exc: OSError) -> str:
    """OpenSSL's reason (`TLSV13_ALERT_CERTIFICATE_REQUIRED`) or the system's words."""
    reason = getattr(exc, "reason", None)
    return str(reason or exc.strerror or exc or type(exc).__name__)


def _handshake(
    talk: _Conversation, context: ssl.SSLContext, server_hostname: str, seen: _Seen
) -> None:
    try:
        tls = talk.start_tls(context, server_hostname)
    except ssl.SSLCertVerificationError as exc:
        seen.rejection = exc
        raise _Stop(certificate_verdict(exc.verify_code), exc.verify_message) from None
    except TimeoutError:
        raise
    except (ssl.SSLError, OSError) as exc:
        raise _Stop(Verdict.TLS_FAILED, f"TLS handshake failed: {_reason(exc)}") from None
    seen.tls_version = tls.version()
    cipher = tls.cipher()
    seen.cipher = None if cipher is None else cipher[0]
    seen.certificate_der = tls.getpeercert(binary_form=True)


def _rejection_text(
    verdict: Verdict, message: str, expected: str, cert: CertificateFacts | None
) -> str:
    if cert is None:  # the second look at it failed: OpenSSL's words alone
        return f"certificate rejected ({verdict}): {message}"
    if verdict is Verdict.WRONG_NAME:
        return f"certificate names {', '.join(cert.names) or 'nothing'}, not {expected}"
    if verdict is Verdict.EXPIRED:
        return f"certificate expired {_utc(cert.not_after)}"
    if verdict is Verdict.NOT_YET_VALID:
        return f"certificate not valid before {_utc(cert.not_before)}"
    if verdict is Verdict.UNTRUSTED:
        return f"certificate does not chain to gateway.ca ({message}; issuer {cert.issuer})"
    return f"certificate rejected: {message}"


def _facts(der: bytes | None) -> CertificateFacts | None:
    return None if der is None else CertificateFacts.from_der(der)


def check_service(
    service: ServiceName,
    host: str,
    port: int,
    security: Security,
    expected_name: str,
    contexts: TlsContexts | None,
    *,
    helo: str,
    timeout: float = DEFAULT_TIMEOUT,
) -> ServiceCheck:
    """Reach one service as the gateway would and say what stands between it and a login."""
    steps = dialect(service, helo)
    seen = _Seen()
    result = partial(
        ServiceCheck,
        service=service,
        host=host,
        port=port,
        security=security,
        expected_name=None if security == "none" else expected_name,
        client_certificate=contexts is not None and contexts.client_certificate,
    )
    verifying = None if contexts is None else contexts.verifying
    try:
        _converse(host, port, security, steps, verifying, expected_name, timeout, seen)
    except _Stop as stop:
        if seen.rejection is None or contexts is None:
            return result(
                verdict=stop.verdict,
                found=stop.found,
                greeting=seen.greeting,
                starttls_offered=seen.starttls_offered,
                tls_version=seen.tls_version,
                cipher=seen.cipher,
                certificate=_facts(seen.certificate_der),
            )
        # The handshake that refused the certificate shows none of it: ask again, unchecked,
        # only to show which certificate it was (the dialogue is the same, still no login).
        shown = _Seen()
        with contextlib.suppress(_Stop):
            _converse(
                host, port, security, steps, contexts.inspecting, expected_name, timeout, shown
            )
        cert = _facts(shown.certificate_der)
        return result(
            verdict=stop.verdict,
            found=_rejection_text(stop.verdict, stop.found, expected_name, cert),
            greeting=seen.greeting or shown.greeting,
            starttls_offered=seen.starttls_offered,
            tls_version=shown.tls_version,
            cipher=shown.cipher,
            certificate=cert,
        )
    if security == "none":
        offered = (
            f'; it offers {steps.starttls_word}: security = "starttls" would use it'
            if seen.starttls_offered
            else ""
        )
        return result(
            verdict=Verdict.UNENCRYPTED,
            found=f"reachable, unencrypted (tests only){offered}",
            greeting=seen.greeting,
            starttls_offered=seen.starttls_offered,
        )
    assert seen.certificate_der is not None  # a verified handshake always has one
    return result(
        verdict=Verdict.VERIFIED,
        found=f"chain verified to gateway.ca, certificate names {expected_name}",
        greeting=seen.greeting,
        starttls_offered=seen.starttls_offered,
        tls_version=seen.tls_version,
        cipher=seen.cipher,
        certificate=CertificateFacts.from_der(seen.certificate_der),
    )


def check_backend(
    gateway: GatewayConfig, *, helo: str, timeout: float = DEFAULT_TIMEOUT
) -> BackendReport:
    """Every configured backend service, in the order smtp, imap, pop3."""
    if not gateway.enabled:
        raise BackendCheckError(
            "gateway mode is off ([gateway] enabled = false): no backend to check"
        )
    client = None
    if gateway.client_cert is not None and gateway.client_key is not None:
        client = (gateway.client_cert, gateway.client_key)
    checks: list[ServiceCheck] = []
    for name, service in gateway.services():
        contexts = None
        if service.security != "none":
            assert gateway.ca is not None  # GatewayConfig requires it when a service uses TLS
            # The client certificate is presented to the backend's SMTP only (docs/gateway-mode.md).
            contexts = tls_contexts(gateway.ca, client if name == "smtp" else None)
        checks.append(
            check_service(
                name,
                service.host,
                gateway.port(name),
                service.security,
                gateway.certificate_name_for(name),
                contexts,
                helo=helo,
                timeout=timeout,
            )
        )
    return BackendReport(gateway.ca, tuple(checks))
