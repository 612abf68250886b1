"""The config's value types (config/types.py) validate through the one parser per grammar."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import TypeAdapter, ValidationError

from postwarden.config.types import Listen, Network, Seconds
from postwarden.syntax.endpoints import parse_listen_address
from postwarden.syntax.networks import parse_network


@pytest.mark.parametrize(
    "text", ["10.0.0.0/8", "192.168.2.0:255.255.255.0", "192.168.1.*", "::ffff:10.0.0.0/104"]
)
def test_a_network_in_the_config_is_what_the_lists_parser_reads(text: str) -> None:
    assert TypeAdapter(Network).validate_python(text) == parse_network(text)


def test_an_ipv4_mapped_network_is_stored_as_ipv4() -> None:
    assert TypeAdapter(Network).validate_python("::ffff:10.0.0.0/104") == (
        ipaddress.ip_network("10.0.0.0/8")
    )


@pytest.mark.parametrize("text", ["10.0.0.0/0.0.0.255", "*", "not-a-network", "300.1.1.0/24"])
def test_a_bad_network_names_the_forms_allowed(text: str) -> None:
    with pytest.raises(ValidationError, match="not an IP network"):
        TypeAdapter(Network).validate_python(text)


def test_listen_addresses_round_trip_through_their_text() -> None:
    adapter = TypeAdapter(Listen)
    for text in ("unix:/run/postwarden/policyd.sock", "inet:127.0.0.1:10040"):
        parsed = adapter.validate_python(text)
        assert parsed == parse_listen_address(text)
        assert adapter.dump_python(parsed) == text


def test_seconds_are_zero_or_more() -> None:
    assert TypeAdapter(Seconds).validate_python(0) == 0
    with pytest.raises(ValidationError, match="zero or more seconds"):
        TypeAdapter(Seconds).validate_python(-1)
