"""The one network grammar: every form, IPv4-mapped as IPv4, refusals with a reason."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postwarden.config.mail import parse_client_pattern
from postwarden.config.types import parse_network as config_parse_network
from postwarden.policy.list_entries import InvalidEntry, parse_entry
from postwarden.syntax.networks import (
    NetworkSyntaxError,
    parse_ipv4_range,
    parse_network,
    unmapped_network,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3", "10.1.2.3/32"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("192.168.2.7/255.255.255.0", "192.168.2.0/24"),
        ("192.168.2.7:255.255.255.0", "192.168.2.0/24"),
        ("192.168.1.*", "192.168.1.0/24"),
        ("10.*.*", "10.0.0.0/8"),
        ("2001:db8::1/32", "2001:db8::/32"),
        ("::ffff:192.0.2.1", "192.0.2.1/32"),
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        (" 10.0.0.0/8 ", "10.0.0.0/8"),
    ],
)
def test_every_network_form(text: str, expected: str) -> None:
    assert str(parse_network(text)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("*", "every address"),
        ("10.*.1", "trailing octets"),
        ("10.1*", "whole octet"),
        ("1.2.3.4.*", "at most four octets"),
        ("10.0.0.0/33", "longer than 32 bits"),
        ("10.0.0.0/0.0.0.255", "not contiguous"),
        ("10.0.0.0:255.0.255.0", "not contiguous"),
        ("10.0.0.0:255.255", "dotted netmask"),
        ("fe80::1%eth0", "zone"),
        ("10.0.0.0/x", "prefix length"),
        ("10.0.0.0/\uff18", "prefix length"),  # a fullwidth digit is no prefix length
        ("example.com", "not a valid IP address"),
    ],
)
def test_refusals_say_why(text: str, reason: str) -> None:
    with pytest.raises(NetworkSyntaxError, match=reason):
        parse_network(text)


def test_ipv4_mapped_networks_are_ipv4_and_others_unchanged() -> None:
    assert unmapped_network(ipaddress.ip_network("::ffff:10.0.0.0/104")) == ipaddress.ip_network(
        "10.0.0.0/8"
    )
    wide = ipaddress.ip_network("::ffff:0:0/80", strict=False)
    assert unmapped_network(wide) == wide


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.2", ("127.0.0.2", "127.0.0.2")),
        ("127.0.0.11-127.0.0.2", ("127.0.0.2", "127.0.0.11")),
        ("127.0.1.0/24", ("127.0.1.0", "127.0.1.255")),
        ("127.0.0.*", ("127.0.0.0", "127.0.0.255")),
    ],
)
def test_dnsbl_code_filters(text: str, expected: tuple[str, str]) -> None:
    low, high = (int(ipaddress.IPv4Address(a)) for a in expected)
    assert parse_ipv4_range(text) == (low, high)


@pytest.mark.parametrize("text", ["::1", "127.0.0.2-::1", "2001:db8::/32", "127.0.0.2-", "x"])
def test_dnsbl_code_filters_are_ipv4(text: str) -> None:
    with pytest.raises(NetworkSyntaxError):
        parse_ipv4_range(text)


@given(st.text(alphabet="0123456789abcdef.:/*% -", max_size=24))
def test_config_connection_control_and_lists_agree(text: str) -> None:
    """The config's network types and the list entries read networks by the same grammar."""
    try:
        expected = parse_network(text)
    except NetworkSyntaxError:
        with pytest.raises(ValueError):
            config_parse_network(text)
        with pytest.raises(ValueError):
            parse_client_pattern(text)
        return
    assert config_parse_network(text) == expected
    assert parse_client_pattern(text) == expected
    try:
        entry = parse_entry(text)
    except InvalidEntry:
        return  # a domain-looking string is the list's, not a network
    assert ipaddress.ip_network(entry) == expected
