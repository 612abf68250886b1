"""The socketmap netstring codec: captured requests, split anywhere, hostile framing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.socketmap_codec import (
    MAX_REQUEST_LENGTH,
    BadNetstring,
    MalformedRequest,
    NetstringDecoder,
    RequestTooLarge,
    SocketmapReply,
    SocketmapRequest,
    encode_netstring,
)

# What Postfix 3.7's dict_socketmap sends for `postmap -q` / a cleanup lookup, two requests.
CAPTURE = b"28:aliases manager@example.test,26:aliases Sales@Example.Test,"


def test_decodes_two_pipelined_requests() -> None:
    assert NetstringDecoder().feed(CAPTURE) == [
        SocketmapRequest("aliases", "manager@example.test"),
        SocketmapRequest("aliases", "Sales@Example.Test"),
    ]


@pytest.mark.parametrize("offset", range(len(CAPTURE) + 1))
def test_split_at_every_offset_gives_the_same_requests(offset: int) -> None:
    decoder = NetstringDecoder()
    got = decoder.feed(CAPTURE[:offset]) + decoder.feed(CAPTURE[offset:])
    assert got == NetstringDecoder().feed(CAPTURE)
    assert decoder.pending == 0


def test_byte_by_byte() -> None:
    decoder = NetstringDecoder()
    got = [r for i in range(len(CAPTURE)) for r in decoder.feed(CAPTURE[i : i + 1])]
    assert len(got) == 2


@pytest.mark.parametrize(
    "data",
    [b"x:aliases a,", b"5:aliases a,", b"-1:a b,", b"05:a b c,", b"4 :a b,", b"abc"],
)
def test_bad_netstrings_are_fatal(data: bytes) -> None:
    decoder = NetstringDecoder()
    with pytest.raises(BadNetstring):
        decoder.feed(data)
    # Once out of step the stream stays refused, even if good bytes follow.
    with pytest.raises(BadNetstring):
        decoder.feed(CAPTURE)


def test_oversized_request_refused_before_it_is_buffered() -> None:
    decoder = NetstringDecoder()
    with pytest.raises(RequestTooLarge):
        decoder.feed(b"%d:" % (MAX_REQUEST_LENGTH + 1))


def test_endless_length_prefix_refused() -> None:
    with pytest.raises(RequestTooLarge):
        NetstringDecoder().feed(b"9" * 50)


def test_largest_request_accepted() -> None:
    key = "a" * (MAX_REQUEST_LENGTH - len("aliases "))
    got = NetstringDecoder().feed(encode_netstring(f"aliases {key}".encode()))
    assert got == [SocketmapRequest("aliases", key)]


@pytest.mark.parametrize("payload", [b"aliases", b" key", b"", b"aliases \x00x"])
def test_request_without_name_and_key_is_malformed_not_fatal(payload: bytes) -> None:
    decoder = NetstringDecoder()
    got = decoder.feed(encode_netstring(payload) + CAPTURE)
    assert isinstance(got[0], MalformedRequest)
    assert len(got) == 3


def test_non_utf8_key_is_decoded_with_replacements() -> None:
    (req,) = NetstringDecoder().feed(encode_netstring(b"aliases \xffx@example.test"))
    assert isinstance(req, SocketmapRequest)
    assert req.key == "\ufffdx@example.test"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_violations(data: bytes) -> None:
    decoder = NetstringDecoder()
    with contextlib.suppress(BadNetstring, RequestTooLarge):
        requests = decoder.feed(data)
        # Whatever is decoded is a well-formed request, never a half-parsed value.
        assert all(isinstance(r, SocketmapRequest) and r.name for r in requests)


_KEYS = st.text(min_size=1, max_size=40).filter(lambda s: " " not in s and "\x00" not in s)


@given(st.lists(_KEYS, max_size=5))
def test_roundtrip_of_any_keys(keys: list[str]) -> None:
    data = b"".join(encode_netstring(f"aliases {k}".encode()) for k in keys)
    assert NetstringDecoder().feed(data) == [SocketmapRequest("aliases", k) for k in keys]


def test_reply_encoding() -> None:
    assert SocketmapReply("OK", "a@x,b@y").encode() == b"10:OK a@x,b@y,"
    assert SocketmapReply("NOTFOUND").encode() == b"9:NOTFOUND ,"
    # Reasons are one printable line: they end up in Postfix's log.
    assert SocketmapReply("TEMP", "a\nb").encode() == b"8:TEMP a?b,"
    assert (
        SocketmapReply("PERM", "x\u00e9" + "y" * 500).encode() == b"205:PERM x?" + b"y" * 198 + b","
    )
