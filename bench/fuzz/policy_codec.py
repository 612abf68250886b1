"""Harness: the policy delegation codec (policyd/policy_codec.py) on arbitrary bytes.

The input is a stream and where it is cut into reads (bench/fuzz/reads.py). Checked per
input (the same invariants as tests/unit/policyd/test_policy_codec_fuzz.py):

- feed() raises nothing and returns only requests or ProtocolViolations;
- every request is answered once or the connection closed: one result per empty line, or
  fewer with one fatal violation as the last result (after it nothing more is decoded);
- the results do not depend on how the stream was split (which also pits the decoder's
  one-block fast path against its line-by-line path);
- at most one unfinished line is buffered and a request's size stays within its limit;
- each decoded request, encoded again as Postfix would send it, decodes to itself;
- a verdict whose text is the stream encodes to one `action=` line ended by the empty line.
"""

from __future__ import annotations

from bench.fuzz.reads import stream_and_reads
from policyd.policy_codec import (
    MAX_LINE_LENGTH,
    MAX_REQUEST_BYTES,
    DecodeResult,
    ProtocolViolation,
    RequestDecoder,
    encode_verdict,
)
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Action, Rule, Verdict

ACTIONS = list(Action)
RULES = list(Rule)
# Starting points for the mutator: what Postfix sends, one request and two in a row.
POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=192.0.2.10\nclient_name=mail.example.net\nhelo_name=mail.example.net\n"
    b"sender=alice@example.net\nrecipient=bob@example.com\nqueue_id=\nsasl_username=\n"
    b"size=1234\nccert_subject=\nencryption_protocol=TLSv1.3\n\n"
)
SEEDS = [
    b"\x00" + POSTFIX_REQUEST,
    b"\x02\x00\x1b\x01\x84" + POSTFIX_REQUEST * 2,  # cut inside a line and at "\n|\n"
    b"\x01\x00\x1c" + b"request=smtpd_access_policy\r\nx=\xff\r\n\r\nno-equals\n\n",
]


def _key(result: DecodeResult) -> object:
    if isinstance(result, PolicyRequest):
        return dict(result.attributes)
    return (type(result).__name__, result.args)


def _decode(reads: list[bytes]) -> list[DecodeResult]:
    decoder = RequestDecoder()
    results: list[DecodeResult] = []
    for read in reads:
        results += decoder.feed(read)
        if not decoder._broken:
            assert len(decoder._buffer) <= MAX_LINE_LENGTH, "unbounded buffer"
            assert decoder._request_bytes <= MAX_REQUEST_BYTES, "unbounded request"
    for result in results:
        assert isinstance(result, PolicyRequest | ProtocolViolation), type(result)
    return results


def _assert_answered_once_or_closed(stream: bytes, results: list[DecodeResult]) -> None:
    empty_lines = sum(line in (b"", b"\r") for line in stream.split(b"\n")[:-1])
    fatal = [i for i, r in enumerate(results) if isinstance(r, ProtocolViolation) and r.fatal]
    if fatal:
        assert fatal == [len(results) - 1], "results after a fatal violation"
        assert len(results) <= empty_lines + 1, "more results than requests"
    else:
        assert len(results) == empty_lines, "a request not answered exactly once"


def _reencoded(request: PolicyRequest) -> bytes | None:
    """The request as Postfix would send it; None if that would exceed the codec's limits
    (a U+FFFD that replaced one invalid byte takes three)."""
    lines = [f"{name}={value}".encode() for name, value in request.attributes.items()]
    # A value ending in CR keeps it only with CRLF after it (the decoder strips one CR).
    encoded = b"".join(line + (b"\r\n" if line.endswith(b"\r") else b"\n") for line in lines)
    if max(map(len, lines)) + 1 > MAX_LINE_LENGTH or len(encoded) + 1 > MAX_REQUEST_BYTES:
        return None
    return encoded + b"\n"


def one_input(data: bytes) -> None:
    choice, stream, reads = stream_and_reads(data)
    chunked = _decode(reads)
    _assert_answered_once_or_closed(stream, chunked)
    if len(reads) > 1:
        whole = _decode([stream])
        assert [_key(r) for r in chunked] == [_key(r) for r in whole], "split changed results"
    for result in chunked:
        if isinstance(result, PolicyRequest) and (again := _reencoded(result)) is not None:
            assert [_key(r) for r in _decode([again])] == [_key(result)], "re-encode differs"
    text = stream.decode("utf-8", "replace")
    verdict = Verdict(
        ACTIONS[choice % len(ACTIONS)],
        RULES[choice % len(RULES)],
        smtp_code=(400 + choice) if choice % 3 else None,
        enhanced_code=text[:7] if choice % 2 else "5.7.1",
        text=text,
    )
    encoded = encode_verdict(verdict)
    body = encoded[:-2]
    assert encoded.startswith(b"action=") and encoded.endswith(b"\n\n"), encoded[:80]
    assert b"\n" not in body and b"\r" not in body and body.isascii(), encoded[:80]
