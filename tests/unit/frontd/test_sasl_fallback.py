"""frontd's side of Dovecot's auth-client protocol while Dovecot is away."""

from __future__ import annotations

from frontd.sasl_fallback import SASL_MECHANISMS, ends_connection, handshake


def test_the_handshake_is_dovecots_shape_and_ends_with_done() -> None:
    lines = handshake(123, 7, "ab" * 16).decode().splitlines()
    assert lines[0] == "VERSION\t1\t2"
    assert [line.split("\t")[1] for line in lines if line.startswith("MECH\t")] == list(
        SASL_MECHANISMS
    )
    assert "SPID\t123" in lines and "CUID\t7" in lines and f"COOKIE\t{'ab' * 16}" in lines
    assert lines[-1] == "DONE"


def test_only_auth_and_cont_end_the_connection() -> None:
    assert ends_connection(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=AGEAYg==\n")
    assert ends_connection(b"CONT\t1\tAGEAYg==\n")
    assert not ends_connection(b"VERSION\t1\t0\n")
    assert not ends_connection(b"CPID\t4242\n")
