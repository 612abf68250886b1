"""frontd's side of Dovecot's auth-client protocol while Dovecot is away."""

from __future__ import annotations

from frontd.sasl_fallback import MAX_KEPT_LINES, SASL_MECHANISMS, Step, handshake, next_step


def test_the_handshake_is_dovecots_shape_and_ends_with_done() -> None:
    lines = handshake(123, 7, "ab" * 16).decode().splitlines()
    assert lines[0] == "VERSION\t1\t2"
    assert [line.split("\t")[1] for line in lines if line.startswith("MECH\t")] == list(
        SASL_MECHANISMS
    )
    assert "SPID\t123" in lines and "CUID\t7" in lines and f"COOKIE\t{'ab' * 16}" in lines
    assert lines[-1] == "DONE"


def test_auth_is_handed_over_and_the_handshake_lines_kept() -> None:
    assert next_step(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=AGEAYg==\n", 2) is Step.HAND_OVER
    assert next_step(b"VERSION\t1\t0\n", 0) is Step.KEEP
    assert next_step(b"CPID\t4242\n", 1) is Step.KEEP


def test_eof_a_cont_without_auth_and_an_endless_prelude_close() -> None:
    assert next_step(b"", 0) is Step.CLOSE
    assert next_step(b"CONT\t1\tAGEAYg==\n", 2) is Step.CLOSE
    assert next_step(b"CPID\t1\n", MAX_KEPT_LINES) is Step.CLOSE
