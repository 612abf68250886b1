"""Untrusted text made safe for replies, headers and log lines (syntax/untrusted_text.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postwarden.syntax.untrusted_text import sanitise


def test_plain_ascii_is_kept() -> None:
    assert sanitise("alice@example.org", 100) == "alice@example.org"


def test_line_breaks_and_controls_cannot_forge_a_line() -> None:
    assert sanitise("a\r\nverdict=REJECT\x00\x1b[31m", 100) == "a??verdict=REJECT??[31m"


def test_non_ascii_and_undecodable_bytes_become_question_marks() -> None:
    assert sanitise("jörg@exämple.test", 100) == "j?rg@ex?mple.test"
    assert sanitise(b"\xff\xfeok", 100) == "??ok"


@given(st.one_of(st.text(), st.binary()), st.integers(min_value=0, max_value=300))
def test_any_input_is_one_printable_ascii_line_within_the_limit(
    value: str | bytes, limit: int
) -> None:
    out = sanitise(value, limit)
    assert len(out) <= limit
    assert all(" " <= ch <= "~" for ch in out)
