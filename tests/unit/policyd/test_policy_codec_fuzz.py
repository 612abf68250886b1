"""Fuzzing the policy delegation codec: arbitrary bytes, split anywhere, never a surprise.

What must hold for every input (the table in the codec's docstring): `feed()` raises
nothing, returns only requests or `ProtocolViolation`s, decodes each request exactly once
however the bytes are split, keeps at most one unfinished line buffered, and every encoded
verdict is one reply ended by the empty line, whatever text it carries.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

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

# CI budget: each test here finishes in a few seconds.
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Attribute names and values as a broken or hostile client might send them: any byte but
# the line end, and names without "=" (the first "=" splits name from value).
ATTR_NAME = st.binary(min_size=1, max_size=20).filter(lambda b: b"\n" not in b and b"=" not in b)
ATTR_VALUE = st.binary(max_size=60).filter(lambda b: b"\n" not in b)
# Bytes biased towards what the decoder treats specially.
SPECIAL_BYTES = st.lists(
    st.sampled_from([b"\n", b"\r", b"=", b"\x00", b"\xff", b"a", b"request=smtpd_access_policy"]),
    max_size=80,
).map(b"".join)
GARBAGE = st.one_of(st.binary(max_size=400), SPECIAL_BYTES)


def _key(result: DecodeResult) -> object:
    """Comparable form of a decode result (exceptions compare by identity otherwise)."""
    if isinstance(result, PolicyRequest):
        return ("request", dict(result.attributes))
    return (type(result).__name__, result.args)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _feed_all(decoder: RequestDecoder, chunks: list[bytes]) -> list[DecodeResult]:
    results: list[DecodeResult] = []
    for chunk in chunks:
        results += decoder.feed(chunk)
        _assert_bounded(decoder)
    return results


def _assert_bounded(decoder: RequestDecoder) -> None:
    # At most one unfinished line is buffered; finished lines count towards the request.
    assert len(decoder._buffer) <= MAX_LINE_LENGTH
    # After a fatal violation the counter holds the rejected size; nothing more is kept.
    assert decoder._broken or decoder._request_bytes <= MAX_REQUEST_BYTES


def _encode_request(attrs: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"request=smtpd_access_policy", *(n + b"=" + v for n, v in attrs)]
    return b"".join(line + b"\n" for line in lines) + b"\n"


def _expected(attrs: list[tuple[bytes, bytes]]) -> DecodeResult:
    """What one well-framed request decodes to, computed independently of the codec."""
    lines = [b"request=smtpd_access_policy", *(n + b"=" + v for n, v in attrs)]
    decoded: dict[str, str] = {}
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        name, _, value = line.partition(b"=")
        if b"\x00" in line or not name:
            return ProtocolViolation("MalformedLine")
        decoded[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    if decoded["request"] != "smtpd_access_policy":  # a later "request=" line overrode it
        return ProtocolViolation("UnknownRequest")
    return PolicyRequest(decoded)


@FUZZ
@given(data=GARBAGE, cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_never_raise_and_splitting_does_not_matter(
    data: bytes, cuts: list[int]
) -> None:
    whole = RequestDecoder().feed(data)
    chunked = _feed_all(RequestDecoder(), _split(data, cuts))
    assert all(isinstance(r, PolicyRequest | ProtocolViolation) for r in whole)
    assert [_key(r) for r in chunked] == [_key(r) for r in whole]
    # One result per empty line (an empty request too, so replies stay in step with the
    # client), plus at most one fatal violation.
    empty_lines = sum(line in (b"", b"\r") for line in data.split(b"\n")[:-1])
    fatal = [i for i, r in enumerate(whole) if isinstance(r, ProtocolViolation) and r.fatal]
    if fatal:
        assert fatal == [len(whole) - 1] and len(whole) <= empty_lines + 1
    else:
        assert len(whole) == empty_lines


@FUZZ
@given(
    requests=st.lists(st.lists(st.tuples(ATTR_NAME, ATTR_VALUE), max_size=6), max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_every_complete_request_is_decoded_exactly_once(
    requests: list[list[tuple[bytes, bytes]]], cuts: list[int]
) -> None:
    # Values must not turn a line into the empty line (a bare "\r" after CR stripping):
    # names are non-empty, so no line here is empty.
    stream = b"".join(_encode_request(attrs) for attrs in requests)
    results = _feed_all(RequestDecoder(), _split(stream, cuts))
    assert len(results) == len(requests)
    for result, attrs in zip(results, requests, strict=True):
        expected = _expected(attrs)
        if isinstance(expected, PolicyRequest):
            assert result == expected
        else:
            assert isinstance(result, ProtocolViolation) and not result.fatal


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(min_value=MAX_LINE_LENGTH + 1, max_value=4 * MAX_LINE_LENGTH),
    chunk=st.integers(min_value=1, max_value=9000),
)
def test_an_endless_line_is_cut_off_at_the_limit(size: int, chunk: int) -> None:
    decoder = RequestDecoder()
    data = b"request=smtpd_access_policy\nsender=" + b"a" * size
    results = _feed_all(decoder, [data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert [type(r).__name__ for r in results] == ["LineTooLong"]
    assert decoder.feed(b"request=smtpd_access_policy\n\n") == []  # stays closed


@settings(max_examples=20, deadline=None)
@given(line=st.integers(min_value=10, max_value=MAX_LINE_LENGTH - 10))
def test_a_request_of_many_short_lines_is_cut_off_at_the_limit(line: int) -> None:
    decoder = RequestDecoder()
    count = MAX_REQUEST_BYTES // line + 2
    data = b"".join(b"k%d=%s\n" % (i, b"v" * line) for i in range(count))
    results = _feed_all(decoder, [data])
    assert [type(r).__name__ for r in results] == ["RequestTooLarge"]


class ChunkedPolicyStream(RuleBasedStateMachine):
    """A client that sends requests and garbage in pieces; the decoder must keep step.

    After every step the results so far equal what one decoder returns for all bytes sent
    at once, and while only well-framed requests were sent, each was answered exactly once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.decoder = RequestDecoder()
        self.sent = bytearray()
        self.results: list[DecodeResult] = []
        self.expected: list[DecodeResult] = []
        self.in_step = True  # only whole requests sent so far
        self.closed = False

    def _send(self, data: bytes, cuts: list[int]) -> None:
        self.sent += data
        for chunk in _split(data, cuts):
            self.results += self.decoder.feed(chunk)
        self.closed = any(isinstance(r, ProtocolViolation) and r.fatal for r in self.results)

    @precondition(lambda self: not self.closed)
    @rule(
        attrs=st.lists(st.tuples(ATTR_NAME, ATTR_VALUE), max_size=5),
        cuts=st.lists(st.integers(min_value=0), max_size=5),
    )
    def send_request(self, attrs: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
        self.expected.append(_expected(attrs))
        self._send(_encode_request(attrs), cuts)

    @rule(data=GARBAGE, cuts=st.lists(st.integers(min_value=0), max_size=5))
    def send_garbage(self, data: bytes, cuts: list[int]) -> None:
        self.in_step = False
        self._send(data, cuts)

    @rule(cuts=st.lists(st.integers(min_value=0), max_size=3))
    def send_long_line(self, cuts: list[int]) -> None:
        self.in_step = False
        self._send(b"x=" + b"y" * MAX_LINE_LENGTH, cuts)

    @invariant()
    def bounded(self) -> None:
        _assert_bounded(self.decoder)

    @invariant()
    def answered_once_or_closed(self) -> None:
        # The server answers every result but a fatal one, which closes the connection:
        # nothing may follow it.
        fatal = [
            i for i, r in enumerate(self.results) if isinstance(r, ProtocolViolation) and r.fatal
        ]
        assert fatal in ([], [len(self.results) - 1])

    @invariant()
    def splitting_does_not_matter(self) -> None:
        once = RequestDecoder().feed(bytes(self.sent))
        assert [_key(r) for r in self.results] == [_key(r) for r in once]

    @invariant()
    def each_request_answered_once(self) -> None:
        if not self.in_step:
            return
        assert len(self.results) == len(self.expected)
        for result, expected in zip(self.results, self.expected, strict=True):
            if isinstance(expected, PolicyRequest):
                assert result == expected
            else:
                assert isinstance(result, ProtocolViolation)


TestChunkedPolicyStream = ChunkedPolicyStream.TestCase
TestChunkedPolicyStream.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)


VERDICTS = st.builds(
    Verdict,
    action=st.sampled_from(list(Action)),
    rule=st.sampled_from(list(Rule)),
    smtp_code=st.none() | st.integers(min_value=-10, max_value=1000),
    enhanced_code=st.none() | st.text(max_size=12) | st.sampled_from(["4.7.1", "5.7.1", "5.1.1"]),
    text=st.one_of(
        st.text(max_size=200),
        st.text(alphabet="\r\n\x00 :aZ\u00e9\u2028\x85", max_size=60),
        st.builds(lambda a, b: f"{a}: {b}", st.text(max_size=20), st.text(max_size=100)),
        st.text(min_size=1000, max_size=2000),
    ),
)


@FUZZ
@given(verdict=VERDICTS)
def test_an_encoded_verdict_is_one_reply_without_injected_lines(verdict: Verdict) -> None:
    encoded = encode_verdict(verdict)
    assert encoded.startswith(b"action=") and encoded.endswith(b"\n\n")
    body = encoded[:-2]
    assert b"\n" not in body and b"\r" not in body and b"\x00" not in body
    assert body.isascii() and body.decode().isprintable()
    # Postfix reads the reply with the same framing: exactly one attribute, no more.
    (reply,) = RequestDecoder().feed(b"request=smtpd_access_policy\n" + encoded)
    assert isinstance(reply, PolicyRequest)
    assert set(reply.attributes) == {"request", "action"}
    assert len(encoded) <= 1100  # reply text ≤ 400, a PREPEND header ≤ 990


class _CountingBuffer(bytearray):
    """The decoder's buffer, counting the bytes its searches and copies go over."""

    work = 0

    def find(self, sub: bytes, start: int = 0, end: int | None = None) -> int:  # type: ignore[override]
        stop = len(self) if end is None else min(end, len(self))
        found = super().find(sub, start, stop)
        _CountingBuffer.work += (found + len(sub) if found >= 0 else stop) - start
        return found

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        item = super().__getitem__(key)
        if isinstance(key, slice):
            _CountingBuffer.work += len(item)
        return item


@pytest.mark.parametrize(
    "unit",
    [
        b"\r\n",  # empty requests, telnet style: found by fuzzing
        b"request=smtpd_access_policy\r\n\r\n",
        b"x=y\r\n\r\n",
        b"request=smtpd_access_policy\n\r\n",
        b"request=smtpd_access_policy\nx=y\n\n",  # Postfix's framing: the fast path
    ],
)
def test_decoding_work_grows_linearly_with_the_input(unit: bytes) -> None:
    """One 64-kB read of many small requests: each request's search for the empty line
    went over the whole rest of the buffer (2 s of CPU for 64 kB of CRLFs)."""
    data = unit * (65536 // len(unit))
    decoder = RequestDecoder()
    decoder._buffer = _CountingBuffer()
    _CountingBuffer.work = 0
    results = decoder.feed(data)
    assert len(results) == len(data) // len(unit)  # one per request: each unit is one
    assert _CountingBuffer.work <= 8 * len(data)
