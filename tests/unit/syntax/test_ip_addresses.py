"""Client addresses as every check sees them: one parser, IPv4-mapped IPv6 as IPv4."""

from __future__ import annotations

import ipaddress

import pytest

from postwarden.policy.dnsbl import query_label
from postwarden.policy.greylisting import client_network
from postwarden.policy.list_entries import ListIndex
from postwarden.policy.precedence import is_outgoing
from postwarden.policy.request import PolicyRequest
from postwarden.syntax.ip_addresses import parse_client_ip, unmapped


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
    ],
)
def test_parse_client_ip_unmaps_and_tolerates_brackets(text: str, expected: str) -> None:
    assert str(parse_client_ip(text)) == expected


@pytest.mark.parametrize("text", ["", "unknown", "192.0.2.300", "mail.example.com"])
def test_parse_client_ip_refuses_a_non_address(text: str) -> None:
    assert parse_client_ip(text) is None


def test_unmapped_leaves_other_addresses_alone() -> None:
    v6 = ipaddress.IPv6Address("2001:db8::1")
    assert unmapped(v6) is v6
    assert unmapped(ipaddress.IPv6Address("::ffff:10.0.0.1")) == ipaddress.IPv4Address("10.0.0.1")


def test_every_check_sees_a_mapped_client_as_its_ipv4_address() -> None:
    mapped = "::ffff:198.51.100.7"
    assert query_label(mapped) == query_label("198.51.100.7")
    assert client_network(mapped) == "198.51.100.0/24"
    assert ListIndex(["198.51.100.0/24"]).contains_ip(ipaddress.ip_address(mapped))
    request = PolicyRequest({"client_address": mapped})
    assert is_outgoing(request, [ipaddress.ip_network("198.51.100.0/24")])
