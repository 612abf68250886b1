"""The pymilter adapter: collect what the MTA sends, hand it to the message handler, apply.

Per-step replies the MTA need not wait for (connect, MAIL, header, body) are negotiated as
no-reply (`@Milter.noreply`, milter protocol 6); steps we do not use (HELO, RCPT, DATA, EOH,
unknown) are not sent at all (pymilter's default `@nocallback`). One instance per SMTP
connection, on libmilter's thread for it.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import threading
import time
from typing import Any, ClassVar

import Milter

from milterd.message_handler import Changes, Envelope, MessageFault, MessageHandler
from milterd.message_metrics import Metrics, NullMetrics
from postwarden.daemon.log_lines import decision_line
from postwarden.dkim.verification import AR_HEADER

log = logging.getLogger("postwarden.milterd")
# pymilter is untyped: name its reply codes once, typed.
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
TEMPFAIL: int = Milter.TEMPFAIL
REJECT: int = Milter.REJECT
# libmilter sends a replacement body in pieces of at most this (MILTER_CHUNK_SIZE).
BODY_CHUNK = 65535


class DkimMilter(Milter.Base):  # type: ignore[misc]
    """One SMTP connection's worth of state."""

    handler: ClassVar[MessageHandler]
    # Messages between MAIL FROM and their end, over all connections. In shared memory
    # (set by the server), so the supervisor can let them finish before it ends the listener.
    busy: ClassVar[ctypes.c_int64] = ctypes.c_int64(0)
    _busy_lock: ClassVar[threading.Lock] = threading.Lock()
    # Set per listener process when milterd.metrics_listen is set (milterd.message_metrics).
    metrics: ClassVar[Metrics | NullMetrics] = NullMetrics()

    def __init__(self) -> None:
        super().__init__()
        self.client_ip: str | None = None
        self.client_name: str | None = None
        self.in_message = False
        self._reset()

    def _begin_message(self) -> None:
        if not self.in_message:
            self.in_message = True
            with self._busy_lock:
                DkimMilter.busy.value += 1

    def _end_message(self) -> None:
        if self.in_message:
            self.in_message = False
            with self._busy_lock:
                DkimMilter.busy.value -= 1

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_parts: list[bytes] = []
        self.auth_authen: str | None = None
        self.mail_from: str | None = None

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.client_name = hostname or None
        if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
            self.client_ip = str(hostaddr[0])
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._reset()
        self._begin_message()
        self.auth_authen = self.getsymval("{auth_authen}") or None
        self.mail_from = mailfrom.strip().removeprefix("<").removesuffix(">") or None
        if self.client_ip is None:
            self.client_ip = self.getsymval("{client_addr}") or None
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    @Milter.decode("bytes")  # type: ignore[untyped-decorator]
    def header(self, name: str | bytes, value: bytes) -> int:
        raw_name = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
        self.headers.append((raw_name, value))
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def body(self, chunk: bytes) -> int:
        self.body_parts.append(chunk)
        return CONTINUE

    def eom(self) -> int:
        queue_id = self.getsymval("i") or "NOQUEUE"
        envelope = Envelope(self.client_ip, self.auth_authen, queue_id, self.mail_from)
        body = b"".join(self.body_parts)
        self.body_parts = []
        started = time.monotonic()
        try:
            changes = self.handler.process(envelope, self.headers, body)
            if changes.reject is None:
                self._apply(changes)
        except MessageFault as exc:
            self.metrics.error("fault")
            return self._on_error(queue_id, str(exc))
        except Exception as exc:  # noqa: BLE001 - never crash or lose a message; say what and go on
            self.metrics.error("internal")
            return self._on_error(queue_id, f"internal error {type(exc).__name__}: {exc}")
        finally:
            self._reset()
            self._end_message()
        elapsed = time.monotonic() - started
        self.metrics.message(changes, elapsed)
        log.info("%s", message_line(envelope, self.client_name, changes, elapsed))
        if changes.reject is not None:
            self.setreply("550", "5.7.1", changes.reject)
            return REJECT
        return ACCEPT

    def abort(self) -> int:
        self._reset()
        self._end_message()
        return CONTINUE

    def close(self) -> int:
        self._end_message()  # the MTA went away mid-message
        return CONTINUE

    def _apply(self, changes: Changes) -> None:
        # Highest index first, so removing one does not renumber those still to remove.
        for index in sorted(changes.remove_results, reverse=True):
            self.chgheader("Authentication-Results", index, "")
        for name, index, value in changes.refold:
            self.chgheader(name, index, value)
        # Insert at the top; reversed so the first field of `add` ends up topmost.
        for name, value in reversed(changes.add):
            self.addheader(name, value, 0)
        # Last and in one run: Postfix ends a body replacement at the next other request.
        if changes.body is not None:
            for start in range(0, len(changes.body), BODY_CHUNK):
                self.replacebody(changes.body[start : start + BODY_CHUNK])

    def _on_error(self, queue_id: str, reason: str) -> int:
        action = self.handler.config.milterd.on_error
        log.warning("%s: %s; on_error=%s", queue_id, reason, action)
        if action == "tempfail":
            self.setreply("451", "4.7.1", "Message cannot be processed now, try again later")
            return TEMPFAIL
        # Accepted as it is, but never with an Authentication-Results claiming to be ours.
        try:
            self._apply(Changes(remove_results=self.handler.forged(self.headers)))
        except Exception as exc:  # noqa: BLE001 - the message still goes through; say why
            log.warning("%s: cannot remove forged %s: %s", queue_id, AR_HEADER, exc)
        return ACCEPT


def message_line(
    envelope: Envelope, client_name: str | None, changes: Changes, elapsed: float
) -> str:
    """The one log line per message, in policyd's format (docs/ARCHITECTURE.md, "Log lines"):

    `milterd: QID: client=name[ip], from=<envelope sender>[, login=L], domain=D, selector=S,
    dkim=R, rule=X[, long_lines=broken][, forged_ar_removed=N], ms=Z`

    - client: the SMTP client's name and address as Postfix reports them (`unknown[local]`
      for mail injected locally, which has no client address);
    - from: the envelope sender (MAIL FROM); login: the SASL login, only when there is one;
    - domain, selector, dkim, rule, long_lines, forged_ar_removed: see `Changes.log_fields()`
      and `MessageRule` in milterd/message_handler.py;
    - ms: the time milterd spent on the message, in milliseconds.
    """
    fields = changes.log_fields()
    if envelope.auth_authen:
        fields = (("login", envelope.auth_authen), *fields)
    return decision_line(
        "milterd",
        envelope.queue_id,
        client_name or "unknown",
        envelope.client_ip or "local",
        envelope.mail_from or "",
        fields,
        elapsed * 1000.0,
    )
