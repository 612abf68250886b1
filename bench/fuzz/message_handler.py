"""Harness: milterd's MessageHandler.process() on a message decoded from arbitrary bytes.

Byte 0 picks the settings (on_error, from_mismatch), the envelope (trusted, local,
submission, inbound) and whether a valid From is put first and whether the result is
signed and then verified. The rest is `fields \\n\\n body`, fields separated by NUL, each
`name:value` (values keep whatever bytes they hold: CR, LF, 8-bit, huge lines).

Checked: only MessageFault escapes; every change is applicable as the milter API takes it
(field names, values without CR and folded only as LF + whitespace, a one-line reject text
and summary).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from milterd.message_handler import Changes, Envelope, MessageFault, MessageHandler
from postwarden.config.model import Config
from postwarden.dkim.keys import SigningKey, generate_key
from postwarden.dkim.verification import DnsTemporaryError, KeyNotFoundError

# Warnings at start ("mail domain localhost has no DKIM key") would flood the fuzzer's output.
logging.disable(logging.CRITICAL)
FIELD_NAME = re.compile(rb"[!-9;-~]+")
FOLDED_VALUE = re.compile(r"[^\r\n]*(\n[ \t][^\r\n]*)*", re.ASCII)

KEYS = [
    SigningKey("example.com", "s1", "rsa-sha256", Path("/k"), generate_key("rsa-sha256")),
    SigningKey("example.com", "e1", "ed25519-sha256", Path("/e"), generate_key("ed25519-sha256")),
]
ZONE = {f"{k.record_name}.".encode(): k.txt_record().encode() for k in KEYS}


def _dnsfunc(name: bytes, timeout: float = 5.0) -> bytes:
    if name in ZONE:
        return ZONE[name]
    if name.startswith(b"slow"):
        raise DnsTemporaryError(name.decode("ascii", "replace"))
    raise KeyNotFoundError(name.decode("ascii", "replace"))


def _handler(on_error: str, from_mismatch: str) -> MessageHandler:
    config = Config.model_validate(
        {
            "mail": {"hostname": "mx.example.org"},
            "milterd": {"on_error": on_error, "from_mismatch": from_mismatch},
        }
    )
    return MessageHandler(config, dnsfunc=_dnsfunc, keys=KEYS)


HANDLERS = [_handler(e, m) for e in ("accept", "tempfail") for m in ("reject", "unsigned")]
ENVELOPES = [
    Envelope("127.0.0.1"),
    Envelope(None),
    Envelope("203.0.113.9", "alice", mail_from="alice@example.com"),
    Envelope("203.0.113.9"),
]
INBOUND = Envelope("203.0.113.9")
# A message as Postfix hands it over: trusted client, signed and verified (0x80 | 0x40).
SEEDS = [
    bytes([0xC0])
    + b"To:bob@example.net\x00Subject:hello\n\tfolded\x00Date:Thu, 3 Dec 2026 05:00:00 +0000"
    + b"\n\nhello\r\n",
    bytes([0x4C]) + b"Authentication-Results:mx.example.org; dkim=pass\n\nbody\r\n",
    bytes([0x08]) + b"From:alice@example.com\x00 X:v\n\n",
]


def decode_message(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(settings byte, header fields, body) from fuzz bytes; total for every input."""
    choice, rest = (data[0], data[1:]) if data else (0, b"")
    block, _, body = rest.partition(b"\n\n")
    headers = []
    for field in block.split(b"\x00") if block else []:
        name, _, value = field.partition(b":")
        headers.append((name or b"X", value))
    if choice & 0x40:
        headers.insert(0, (b"From", b"alice@example.com"))
    return choice, headers, body


def _applicable(changes: Changes) -> None:
    for name, value in changes.add:
        assert FIELD_NAME.fullmatch(name.encode()), name
        assert FOLDED_VALUE.fullmatch(value) and not value.startswith((" ", "\t")), value[:80]
    for _, index, value in changes.refold:
        assert index >= 1 and FOLDED_VALUE.fullmatch(value), value[:80]
    if changes.reject is not None:
        assert changes.reject.isascii() and changes.reject.isprintable(), changes.reject
    assert "\n" not in changes.summary and "\r" not in changes.summary, changes.summary


def _process(
    handler: MessageHandler, envelope: Envelope, headers: list[tuple[bytes, bytes]], body: bytes
) -> Changes | None:
    try:
        changes = handler.process(envelope, headers, body)
    except MessageFault as fault:
        assert "\n" not in str(fault) and "\r" not in str(fault), str(fault)
        return None
    _applicable(changes)
    return changes


def one_input(data: bytes) -> None:
    choice, headers, body = decode_message(data)
    handler = HANDLERS[choice % 4]
    changes = _process(handler, ENVELOPES[(choice >> 2) % 4], headers, body)
    if choice & 0x80 and changes is not None and changes.add:
        # What we signed, as the receiving side sees it: verify it.
        signed = [(n.encode(), v.encode()) for n, v in changes.add] + headers
        _process(handler, INBOUND, signed, body if changes.body is None else changes.body)
