"""The policy delegation codec: real Postfix requests, every split, hostile input, replies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.policy_codec import (
    MAX_ATTRIBUTES,
    MAX_LINE_LENGTH,
    MAX_REQUEST_BYTES,
    LineTooLong,
    MalformedLine,
    ProtocolViolation,
    RequestDecoder,
    RequestTooLarge,
    TooManyAttributes,
    UnknownRequest,
    encode_verdict,
)
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Action, Rule, Verdict, defer, dunno, prepend, reject
from postwarden.syntax.untrusted_text import sanitise

# The example request of SMTPD_POLICY_README with every attribute up to Postfix 3.8,
# byte for byte as smtpd writes it (LF line ends, an empty line at the end).
POSTFIX_REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=SMTP\n"
    b"helo_name=some.domain.tld\n"
    b"queue_id=8045F2AB23\n"
    b"sender=foo@bar.tld\n"
    b"recipient=bar@foo.tld\n"
    b"recipient_count=0\n"
    b"client_address=1.2.3.4\n"
    b"client_name=another.domain.tld\n"
    b"reverse_client_name=another.domain.tld\n"
    b"instance=123.456.7\n"
    b"sasl_method=plain\n"
    b"sasl_username=you\n"
    b"sasl_sender=\n"
    b"size=12345\n"
    b"ccert_subject=solaris9.porcupine.org\n"
    b"ccert_issuer=Wietse+20Venema\n"
    b"ccert_fingerprint=C2:9D:F4:87:71:73:73:D9:18:E7:C2:F3:C1:DA:6E:04\n"
    b"encryption_protocol=TLSv1/SSLv3\n"
    b"encryption_cipher=DHE-RSA-AES256-SHA\n"
    b"encryption_keysize=256\n"
    b"etrn_domain=\n"
    b"stress=\n"
    b"ccert_pubkey_fingerprint=68:B3:29:DA:98:93:E3:40:99:C7:D8:AD:5C:B9:C9:40\n"
    b"client_port=1234\n"
    b"policy_context=submission\n"
    b"server_address=10.3.2.1\n"
    b"server_port=54321\n"
    b"compatibility_level=3.6\n"
    b"mail_version=3.7.10\n"
    b"\n"
)


def _check_postfix_request(result: object) -> None:
    assert isinstance(result, PolicyRequest)
    assert result.protocol_state == "RCPT"
    assert result.client_address == "1.2.3.4"
    assert result.sender == "foo@bar.tld"
    assert result.recipient == "bar@foo.tld"
    assert result.queue_id == "8045F2AB23"
    assert result.instance == "123.456.7"
    assert result.sasl_username == "you"
    assert result.get("sasl_sender") == ""
    assert result.get("ccert_fingerprint") == "C2:9D:F4:87:71:73:73:D9:18:E7:C2:F3:C1:DA:6E:04"
    assert len(result.attributes) == 31


def test_real_postfix_request_decodes_whole() -> None:
    decoder = RequestDecoder()
    results = decoder.feed(POSTFIX_REQUEST)
    assert len(results) == 1
    _check_postfix_request(results[0])
    assert not decoder.pending


@pytest.mark.parametrize("offset", range(1, len(POSTFIX_REQUEST)))
def test_real_postfix_request_split_at_every_offset(offset: int) -> None:
    decoder = RequestDecoder()
    first = decoder.feed(POSTFIX_REQUEST[:offset])
    assert first == []
    assert decoder.pending
    second = decoder.feed(POSTFIX_REQUEST[offset:])
    assert len(second) == 1
    _check_postfix_request(second[0])


def test_byte_by_byte_feed_gives_one_request() -> None:
    decoder = RequestDecoder()
    results = []
    for i in range(len(POSTFIX_REQUEST)):
        results += decoder.feed(POSTFIX_REQUEST[i : i + 1])
    assert len(results) == 1
    _check_postfix_request(results[0])


def test_several_requests_in_one_buffer_come_out_in_order() -> None:
    second = POSTFIX_REQUEST.replace(b"recipient=bar@foo.tld", b"recipient=two@foo.tld")
    third = POSTFIX_REQUEST.replace(b"recipient=bar@foo.tld", b"recipient=three@foo.tld")
    decoder = RequestDecoder()
    results = decoder.feed(POSTFIX_REQUEST + second + third[:50])
    assert [r.recipient for r in results if isinstance(r, PolicyRequest)] == [
        "bar@foo.tld",
        "two@foo.tld",
    ]
    rest = decoder.feed(third[50:])
    assert len(rest) == 1 and isinstance(rest[0], PolicyRequest)
    assert rest[0].recipient == "three@foo.tld"


def test_crlf_line_ends_are_tolerated() -> None:
    results = RequestDecoder().feed(POSTFIX_REQUEST.replace(b"\n", b"\r\n"))
    assert len(results) == 1
    _check_postfix_request(results[0])


def test_value_may_contain_equals_sign() -> None:
    data = b"request=smtpd_access_policy\nsender=a=b@example.com\n\n"
    (result,) = RequestDecoder().feed(data)
    assert isinstance(result, PolicyRequest)
    assert result.sender == "a=b@example.com"


def test_over_long_line_is_fatal_and_stops_decoding() -> None:
    decoder = RequestDecoder()
    results = decoder.feed(b"request=smtpd_access_policy\nsender=" + b"a" * MAX_LINE_LENGTH)
    assert len(results) == 1 and isinstance(results[0], LineTooLong)
    assert results[0].fatal
    # Nothing more is decoded: the server closes the connection.
    assert decoder.feed(POSTFIX_REQUEST) == []


def test_over_long_line_with_its_newline_is_fatal() -> None:
    results = RequestDecoder().feed(b"x=" + b"a" * MAX_LINE_LENGTH + b"\n\n")
    assert len(results) == 1 and isinstance(results[0], LineTooLong)


def test_request_over_size_limit_is_fatal() -> None:
    line = b"x" * 100 + b"=" + b"y" * 1000 + b"\n"
    results = RequestDecoder().feed(line * (MAX_REQUEST_BYTES // len(line) + 1))
    assert len(results) == 1 and isinstance(results[0], RequestTooLarge)
    assert results[0].fatal


def test_too_many_attributes_is_one_error_and_the_next_request_decodes() -> None:
    many = b"".join(b"a%d=1\n" % i for i in range(MAX_ATTRIBUTES + 5))
    decoder = RequestDecoder()
    results = decoder.feed(b"request=smtpd_access_policy\n" + many + b"\n" + POSTFIX_REQUEST)
    assert len(results) == 2
    assert isinstance(results[0], TooManyAttributes) and not results[0].fatal
    _check_postfix_request(results[1])


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"request=smtpd_access_policy\nno equals sign here\n\n",
        b"request=smtpd_access_policy\n=value without name\n\n",
        b"request=smtpd_access_policy\nsender=a\x00b\n\n",
    ],
)
def test_malformed_lines_are_one_error_then_decoding_goes_on(junk: bytes) -> None:
    decoder = RequestDecoder()
    results = decoder.feed(junk + POSTFIX_REQUEST)
    assert len(results) == 2
    assert isinstance(results[0], MalformedLine) and not results[0].fatal
    _check_postfix_request(results[1])


@pytest.mark.parametrize(
    "data",
    [
        b"protocol_state=RCPT\n\n",
        b"request=junk\nprotocol_state=RCPT\n\n",
        b"\n",
    ],
)
def test_missing_or_wrong_request_kind_is_unknown_request(data: bytes) -> None:
    results = RequestDecoder().feed(data)
    assert len(results) == 1 and isinstance(results[0], UnknownRequest)


def test_non_utf8_bytes_are_replaced_not_refused() -> None:
    data = b"request=smtpd_access_policy\nhelo_name=h\xe9\xff.example\n\n"
    (result,) = RequestDecoder().feed(data)
    assert isinstance(result, PolicyRequest)
    assert result.helo_name == "h\ufffd\ufffd.example"
    result.helo_name.encode("utf-8")  # always valid Unicode downstream


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_arbitrary_bytes_only_ever_give_requests_or_violations(chunks: list[bytes]) -> None:
    decoder = RequestDecoder()
    for chunk in chunks:
        for result in decoder.feed(chunk):
            assert isinstance(result, PolicyRequest | ProtocolViolation)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(
            st.characters(blacklist_characters="=\n\r\x00", blacklist_categories=("Cs",)),
            min_size=1,
            max_size=20,
        ),
        st.text(
            st.characters(blacklist_characters="\n\r\x00", blacklist_categories=("Cs",)),
            max_size=50,
        ),
        max_size=20,
    ),
    st.integers(min_value=0, max_value=10_000),
)
def test_any_well_formed_request_round_trips(attrs: dict[str, str], cut: int) -> None:
    attrs = {**attrs, "request": "smtpd_access_policy"}
    data = b"".join(f"{k}={v}\n".encode() for k, v in attrs.items()) + b"\n"
    cut = cut % (len(data) + 1)
    decoder = RequestDecoder()
    results = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
    assert results == [PolicyRequest(attrs)]


@pytest.mark.parametrize(
    ("verdict", "wire"),
    [
        (dunno(Rule.NO_CHECKS), b"action=DUNNO\n\n"),
        (
            reject(Rule.IP_FORBIDDEN, "Client address is forbidden"),
            b"action=550 5.7.1 Client address is forbidden\n\n",
        ),
        (
            Verdict(Action.REJECT, Rule.DNSBL, None, "5.7.1", "Listed"),
            b"action=REJECT 5.7.1 Listed\n\n",
        ),
        (Verdict(Action.REJECT, Rule.DNSBL), b"action=REJECT\n\n"),
        (
            defer(Rule.GREYLIST_DEFER, "Greylisted, please try again later"),
            b"action=DEFER_IF_PERMIT 4.7.1 Greylisted, please try again later\n\n",
        ),
        (
            prepend(Rule.GREYLIST_PASS, "X-Greylist: delayed 301 seconds by postwarden"),
            b"action=PREPEND X-Greylist: delayed 301 seconds by postwarden\n\n",
        ),
    ],
)
def test_each_verdict_kind_encodes_as_access5_action(verdict: Verdict, wire: bytes) -> None:
    assert encode_verdict(verdict) == wire


def test_reply_text_is_sanitised_and_bounded() -> None:
    verdict = reject(Rule.MAILBOX_FORBIDDEN, "bad\r\naction=OK\x00 \u00e9" + "x" * 1000)
    wire = encode_verdict(verdict)
    assert wire.endswith(b"\n\n")
    body = wire[:-2]
    assert b"\n" not in body and b"\r" not in body and b"\x00" not in body
    assert body.isascii()
    assert len(body) < 512


def test_enhanced_code_of_the_wrong_class_is_dropped() -> None:
    wire = encode_verdict(Verdict(Action.DEFER_IF_PERMIT, Rule.GREYLIST_DEFER, None, "5.7.1", "t"))
    assert wire == b"action=DEFER_IF_PERMIT t\n\n"


def test_reject_with_a_4xx_code_stays_temporary() -> None:
    wire = encode_verdict(Verdict(Action.REJECT, Rule.DEFAULT, 451, "4.3.0", "try later"))
    assert wire == b"action=451 4.3.0 try later\n\n"


def test_reject_with_a_nonsense_code_falls_back_to_plain_reject() -> None:
    wire = encode_verdict(Verdict(Action.REJECT, Rule.DNSBL, 250, "5.7.1", "listed"))
    assert wire == b"action=REJECT 5.7.1 listed\n\n"


def test_prepend_without_header_name_says_nothing() -> None:
    assert encode_verdict(prepend(Rule.SPF, "not a header")) == b"action=DUNNO\n\n"


def test_sanitise_replaces_control_and_non_ascii() -> None:
    assert sanitise("a\nb\tc\u00e9", 400) == "a?b?c?"
    assert sanitise(b"x\xffy", 400) == "x?y"
    assert sanitise("a" * 50, 10) == "a" * 10


def _outcome(results: list[object]) -> list[object]:
    return [(type(r).__name__, str(r)) if isinstance(r, ProtocolViolation) else r for r in results]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40).filter(lambda b: b"\n" not in b),
            st.sampled_from([b"sender=a@b.c", b"x=", b"=v", b"no-equals", b"a=\x00", b"\xff=\xfe"]),
        ),
        max_size=12,
    )
)
def test_whole_buffer_and_byte_by_byte_decoding_agree(lines: list[bytes]) -> None:
    # The whole-request fast path must answer exactly what the line-by-line path answers.
    data = b"request=smtpd_access_policy\n" + b"".join(line + b"\n" for line in lines) + b"\n"
    whole = RequestDecoder().feed(data)
    decoder = RequestDecoder()
    piecewise: list[object] = []
    for i in range(len(data)):
        piecewise += decoder.feed(data[i : i + 1])
    assert _outcome(list(whole)) == _outcome(piecewise)
