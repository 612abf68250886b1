"""Garbage over the real policyd's unix socket: one answer per request, or the door shut.

The codec's fuzz tests (tests/unit/policyd/test_policy_codec_fuzz.py) cover the bytes; this
checks the server around it: for any stream, each request the codec sees complete gets
exactly one `action=` reply, a fatal violation closes the connection, and the daemon then
still answers a valid request on a fresh connection.
"""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.policy_codec import ProtocolViolation, RequestDecoder
from tests.fixtures.policyd_daemon import PolicydHandle, StartPolicyd

VALID = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.10\n"
    b"sender=alice@example.org\nrecipient=bob@example.com\n\n"
)
READ_TIMEOUT = 5.0
GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.sampled_from(
            [
                b"\n",
                b"\r\n",
                b"=",
                b"\x00",
                b"\xff",
                b"x=y",
                b"request=smtpd_access_policy",
                b"protocol_state=RCPT",
                b"z" * 9000,
            ]
        ),
        max_size=40,
    ).map(b"".join),
)


def _expected_answers(stream: bytes) -> tuple[int, bool]:
    """How many replies the stream is owed and whether the server must close it."""
    results = RequestDecoder().feed(stream)
    fatal = any(isinstance(r, ProtocolViolation) and r.fatal for r in results)
    return len(results) - fatal, fatal


def _read_replies(sock: socket.socket, count: int) -> tuple[list[bytes], bool]:
    """Read until `count` replies arrived or the server closed; (replies, closed)."""
    data = b""
    while data.count(b"\n\n") < count:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data.split(b"\n\n")[:-1], True
        data += chunk
    replies = data.split(b"\n\n")
    assert replies[-1] == b"", "a partial or extra reply"
    return replies[:-1], False


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def _check_stream(daemon: PolicydHandle, garbage: bytes) -> None:
    stream = garbage + b"\n" + VALID  # the "\n" ends a partial line the garbage left open
    owed, fatal = _expected_answers(stream)
    with daemon.connect(timeout=READ_TIMEOUT) as sock:
        sock.sendall(stream)
        replies, closed = _read_replies(sock, owed)
        assert all(r.startswith(b"action=") and b"\n" not in r for r in replies)
        if fatal:
            # Replies before the fatal line may still arrive; then the connection ends.
            assert len(replies) <= owed and (closed or _closed(sock))
        else:
            assert len(replies) == owed and not closed
            # Nothing extra was queued: the next reply is for the next request.
            sock.sendall(VALID)
            (reply,), _ = _read_replies(sock, 1)
            assert reply.startswith(b"action=")
    with daemon.connect(timeout=READ_TIMEOUT) as sock:
        sock.sendall(VALID)
        (reply,), closed = _read_replies(sock, 1)
        assert reply.startswith(b"action=") and not closed


def test_garbage_streams_get_one_answer_per_request_or_are_closed(
    policyd_daemon: StartPolicyd,
) -> None:
    daemon = policyd_daemon(tcp=False)

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(garbage=GARBAGE)
    def one_stream(garbage: bytes) -> None:
        _check_stream(daemon, garbage)

    one_stream()
    assert daemon.process.poll() is None  # still running
