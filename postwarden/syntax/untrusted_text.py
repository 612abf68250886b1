"""Untrusted text (SMTP envelope, client names) made safe for replies, headers and logs."""

from __future__ import annotations


def sanitise(value: str | bytes, limit: int) -> str:
    """Printable ASCII, single-line text of at most `limit` characters.

    SMTP replies and unencoded headers must be ASCII, and log lines must not be forgeable
    with embedded newlines, so everything else becomes "?".
    """
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if len(text) > limit:
        text = text[:limit]
    if not (text.isascii() and text.isprintable()):
        text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return text
