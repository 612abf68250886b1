"""Dovecot's auth-client protocol as frontd speaks it while Dovecot cannot be reached: pure.

Postfix's smtpd asks the SASL server for its mechanisms when a session that may log in
starts; when the socket cannot be reached it dies with `fatal: no SASL authentication
mechanisms` (smtpd_sasl_glue.c), the client sees the connection close after STARTTLS and
master throttles the service. Announcing the mechanisms ourselves, and closing the
connection when an AUTH arrives while Dovecot is still away, makes Postfix answer that AUTH
with `454 4.7.0 Temporary authentication failure` (xsasl_dovecot_server.c: a lost
connection is XSASL_AUTH_TEMP), which every mail client takes as "try again later". No
credential is read or kept: the AUTH line goes to Dovecot, if it is back by then, or is
dropped with the connection.

The handshake is Dovecot's (auth-client-connection.c): VERSION, one MECH per mechanism
with its flags, SPID, CUID, COOKIE, DONE, each a tab-separated line.

Contract: docs/ARCHITECTURE.md, "What each daemon owns" (frontd).
"""

from __future__ import annotations

import enum

# The mechanisms Dovecot is rendered with (dovecot.conf's auth_mechanisms), and so the
# ones we announce in its place: both send the password in the clear inside TLS.
SASL_MECHANISMS = ("PLAIN", "LOGIN")
AUTH_PROTOCOL_VERSION = (1, 2)
# Postfix says VERSION and CPID before its first AUTH; more is not a handshake.
MAX_KEPT_LINES = 8


def handshake(server_pid: int, connection_id: int, cookie: str) -> bytes:
    """The server's greeting, as Dovecot's auth service sends it on a new connection."""
    major, minor = AUTH_PROTOCOL_VERSION
    lines = [f"VERSION\t{major}\t{minor}"]
    lines += [f"MECH\t{mechanism}\tplaintext" for mechanism in SASL_MECHANISMS]
    lines += [f"SPID\t{server_pid}", f"CUID\t{connection_id}", f"COOKIE\t{cookie}", "DONE"]
    return "".join(line + "\n" for line in lines).encode()


class Step(enum.Enum):
    """What frontd does with one line from Postfix while it stands in for Dovecot."""

    KEEP = "keep"  # VERSION, CPID: said again to Dovecot if the connection is handed over
    HAND_OVER = "hand over"  # AUTH: only Dovecot can answer it; ask it, or close
    CLOSE = "close"  # EOF, CONT without an AUTH, or more lines than a handshake has


def next_step(line: bytes, kept: int) -> Step:
    """The step for `line`, after `kept` lines were kept."""
    command = line.split(b"\t", 1)[0].rstrip(b"\n")
    if command == b"AUTH":
        return Step.HAND_OVER
    if not line or command == b"CONT" or kept >= MAX_KEPT_LINES:
        return Step.CLOSE
    return Step.KEEP
