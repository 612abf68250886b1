"""Fuzzing the socketmap netstring codec: arbitrary bytes, split anywhere, replies framed.

For every input `feed()` returns requests or raises only `SocketmapViolation` (after which
it refuses more), decodes each netstring exactly once however the bytes are split, buffers
at most one request's worth, and every encoded reply's length prefix is its payload's.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from policyd.socketmap_codec import (
    _MAX_LENGTH_DIGITS,
    MAX_REASON,
    MAX_REQUEST_LENGTH,
    DecodeResult,
    MalformedRequest,
    NetstringDecoder,
    SocketmapReply,
    SocketmapRequest,
    SocketmapViolation,
    encode_netstring,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A length prefix, its colon, the longest payload and its comma.
MAX_BUFFERED = _MAX_LENGTH_DIGITS + 1 + MAX_REQUEST_LENGTH + 1

PAYLOAD = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda name, key: name + b" " + key,
        st.sampled_from([b"aliases", b"mailboxes", b"other", b""]),
        st.binary(max_size=100),
    ),
)
SPECIAL_BYTES = st.lists(
    st.sampled_from([b"0", b"1", b"9", b":", b",", b" ", b"\x00", b"4096", b"4097", b"-"]),
    max_size=60,
).map(b"".join)
GARBAGE = st.one_of(st.binary(max_size=300), SPECIAL_BYTES)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _feed(decoder: NetstringDecoder, chunks: list[bytes]) -> tuple[list[DecodeResult], str | None]:
    """Results so far and the violation's class name, checking the bound after each read."""
    results: list[DecodeResult] = []
    for chunk in chunks:
        try:
            results += decoder.feed(chunk)
        except SocketmapViolation as exc:
            return results, type(exc).__name__
        assert decoder.pending <= MAX_BUFFERED
    return results, None


def _expected(payload: bytes) -> DecodeResult:
    text = payload.decode("utf-8", "replace")
    name, sep, key = text.partition(" ")
    if not sep or not name or not key or "\x00" in text:
        return MalformedRequest(text)
    return SocketmapRequest(name, key)


@FUZZ
@given(data=GARBAGE, cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_raise_only_violations_and_splitting_does_not_matter(
    data: bytes, cuts: list[int]
) -> None:
    whole = _feed(NetstringDecoder(), [data])
    chunked = _feed(NetstringDecoder(), _split(data, cuts))
    _assert_same_stream(chunked, whole)


def _assert_same_stream(
    chunked: tuple[list[DecodeResult], str | None], whole: tuple[list[DecodeResult], str | None]
) -> None:
    """Splitting changes nothing, except that a violation drops what its own read decoded.

    That loss is by design: the connection is closed, so Postfix retries those lookups.
    """
    (chunked_results, chunked_violation), (whole_results, whole_violation) = chunked, whole
    assert chunked_violation == whole_violation
    if whole_violation is None:
        assert chunked_results == whole_results
    else:
        assert chunked_results[: len(whole_results)] == whole_results


@FUZZ
@given(payloads=st.lists(PAYLOAD, max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_every_netstring_is_decoded_exactly_once(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_netstring(p) for p in payloads)
    results, violation = _feed(NetstringDecoder(), _split(stream, cuts))
    assert violation is None
    assert results == [_expected(p) for p in payloads]


@settings(max_examples=50, deadline=None)
@given(length=st.integers(min_value=MAX_REQUEST_LENGTH + 1, max_value=10**_MAX_LENGTH_DIGITS - 1))
def test_an_oversized_netstring_is_refused_before_its_payload(length: int) -> None:
    decoder = NetstringDecoder()
    results, violation = _feed(decoder, [b"%d:" % length, b"x" * 100])
    assert (results, violation) == ([], "RequestTooLarge")
    _, again = _feed(decoder, [encode_netstring(b"aliases a@example.com")])
    assert again == "BadNetstring"  # the stream stays out of step


class ChunkedSocketmapStream(RuleBasedStateMachine):
    """Postfix's connection: lookups (and garbage) in pieces; the decoder keeps step."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = NetstringDecoder()
        self.sent = bytearray()
        self.results: list[DecodeResult] = []
        self.violation: str | None = None
        self.expected: list[DecodeResult] = []
        self.in_step = True

    def _send(self, data: bytes, cuts: list[int]) -> None:
        self.sent += data
        if self.violation is not None:
            _, again = _feed(self.decoder, [data])
            assert again == "BadNetstring"
            return
        results, self.violation = _feed(self.decoder, _split(data, cuts))
        self.results += results

    @precondition(lambda self: self.violation is None)
    @rule(payload=PAYLOAD, cuts=st.lists(st.integers(min_value=0), max_size=5))
    def lookup(self, payload: bytes, cuts: list[int]) -> None:
        self.expected.append(_expected(payload))
        self._send(encode_netstring(payload), cuts)

    @rule(data=GARBAGE, cuts=st.lists(st.integers(min_value=0), max_size=5))
    def garbage(self, data: bytes, cuts: list[int]) -> None:
        self.in_step = False
        self._send(data, cuts)

    @invariant()
    def splitting_does_not_matter(self) -> None:
        whole = _feed(NetstringDecoder(), [bytes(self.sent)])
        _assert_same_stream((self.results, self.violation), whole)

    @invariant()
    def each_lookup_decoded_once(self) -> None:
        if self.in_step:
            assert self.results == self.expected


TestChunkedSocketmapStream = ChunkedSocketmapStream.TestCase
TestChunkedSocketmapStream.settings = settings(
    max_examples=60, stateful_step_count=20, deadline=None
)


@FUZZ
@given(
    status=st.sampled_from(["OK", "NOTFOUND", "TEMP", "TIMEOUT", "PERM"]),
    data=st.one_of(st.text(max_size=300), st.text(alphabet=",:\r\n\x00 é\u2028", max_size=50)),
)
def test_a_reply_is_one_netstring_with_the_right_length(status: str, data: str) -> None:
    encoded = SocketmapReply(status, data).encode()  # type: ignore[arg-type]
    digits, colon, rest = encoded.partition(b":")
    assert colon and digits.isdigit() and rest.endswith(b",")
    payload = rest[:-1]
    assert int(digits) == len(payload)
    assert payload.startswith(status.encode() + b" ")
    if status != "OK":
        # A reason reaches Postfix's log line: one printable line, bounded.
        reason = payload[len(status) + 1 :]
        assert len(reason) <= MAX_REASON and reason.isascii() and reason.decode().isprintable()
    # Read back with the same framing, the reply is exactly one netstring.
    assert _feed(NetstringDecoder(), [encoded]) == ([_expected(payload)], None)
