"""Harness: the socketmap netstring codec (policyd/socketmap_codec.py) on arbitrary bytes.

The input is a stream and where it is cut into reads (bench/fuzz/reads.py). Checked
(as in tests/unit/policyd/test_socketmap_codec_fuzz.py): feed() raises nothing but the
codec's SocketmapViolation, and refuses more afterwards (the server closes the connection);
splitting changes nothing but what a violation's own read decoded; the buffer stays within
one request; each decoded request, encoded again, decodes to itself; a reply built from the
stream has the right length prefix and a one-line reason.
"""

from __future__ import annotations

from bench.fuzz.reads import stream_and_reads
from policyd.socketmap_codec import (
    _MAX_LENGTH_DIGITS,
    MAX_REASON,
    MAX_REQUEST_LENGTH,
    BadNetstring,
    DecodeResult,
    MalformedRequest,
    NetstringDecoder,
    SocketmapReply,
    SocketmapRequest,
    SocketmapViolation,
    encode_netstring,
)

MAX_BUFFERED = _MAX_LENGTH_DIGITS + 1 + MAX_REQUEST_LENGTH + 1
STATUSES = ("OK", "NOTFOUND", "TEMP", "TIMEOUT", "PERM")
# What Postfix sends: lookups one after the other on one connection.
SEEDS = [
    b"\x00" + encode_netstring(b"aliases alice@example.com"),
    b"\x02\x00\x01\x00\x1f"
    + encode_netstring(b"mailboxes bob@example.com")
    + encode_netstring(b"aliases x@y"),
    b"\x01\x00\x02" + encode_netstring(b"nokey") + b"0:,",
]


def _reencoded(result: DecodeResult) -> bytes:
    if isinstance(result, SocketmapRequest):
        return encode_netstring(f"{result.name} {result.key}".encode())
    return encode_netstring(result.payload.encode())


def _decode(reads: list[bytes]) -> tuple[list[DecodeResult], str | None]:
    decoder = NetstringDecoder()
    results: list[DecodeResult] = []
    for read in reads:
        try:
            results += decoder.feed(read)
        except SocketmapViolation as exc:
            try:
                decoder.feed(b"1:x,")
            except BadNetstring:
                return results, type(exc).__name__
            raise AssertionError("decoder accepted input after a violation") from None
        assert decoder.pending <= MAX_BUFFERED, "unbounded buffer"
    return results, None


def one_input(data: bytes) -> None:
    choice, stream, reads = stream_and_reads(data)
    chunked, chunked_violation = _decode(reads)
    whole, whole_violation = _decode([stream])
    assert chunked_violation == whole_violation, (chunked_violation, whole_violation)
    # A violation drops what its own read decoded (the connection closes; Postfix retries).
    assert chunked[: len(whole)] == whole, "split changed results"
    if whole_violation is None:
        assert chunked == whole, "split changed results"
    for result in whole:
        assert isinstance(result, SocketmapRequest | MalformedRequest), type(result)
        again = _reencoded(result)
        # A U+FFFD that replaced one invalid byte takes three: it may no longer fit.
        if len(again) <= MAX_BUFFERED:
            assert _decode([again]) == ([result], None), "re-encode differs"
    status = STATUSES[choice % len(STATUSES)]
    encoded = SocketmapReply(status, stream.decode("utf-8", "replace")).encode()  # type: ignore[arg-type]
    digits, _, rest = encoded.partition(b":")
    assert digits.isdigit() and rest.endswith(b",") and int(digits) == len(rest) - 1, encoded[:40]
    if status != "OK":
        reason = rest[len(status) + 1 : -1]
        assert len(reason) <= MAX_REASON and reason.isascii(), reason[:40]
        assert reason.decode().isprintable(), reason[:40]
