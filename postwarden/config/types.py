"""Value types shared by the config sections: listen addresses, networks, durations.

Each type validates through the one parser of its grammar in `postwarden.syntax`, which the
daemons use too, so what `config check` accepts is what they run with.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import AfterValidator, PlainSerializer, PlainValidator

from postwarden.syntax import networks
from postwarden.syntax.endpoints import ListenAddress
from postwarden.syntax.endpoints import parse_listen_address as _parse_listen_text
from postwarden.syntax.networks import NETWORK_FORMS, IPNetwork

__all__ = [
    "IPNetwork",
    "Listen",
    "ListenAddress",
    "Network",
    "Seconds",
    "parse_listen_address",
    "parse_network",
]


def parse_listen_address(value: object) -> ListenAddress:
    """Parse `unix:/path` or `inet:host:port`; raise ValueError saying what is allowed."""
    if isinstance(value, ListenAddress):
        return value
    if not isinstance(value, str):
        raise ValueError('must be a string like "unix:/run/x.sock" or "inet:127.0.0.1:10040"')
    return _parse_listen_text(value)


def parse_network(value: object) -> IPNetwork:
    """A network in any form `postwarden.syntax.networks` reads; ValueError naming the forms."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return networks.unmapped_network(value)
    if not isinstance(value, str):
        raise ValueError("must be a string such as 192.168.0.0/16 or 10.0.0.5/255.255.255.255")
    try:
        return networks.parse_network(value)
    except networks.NetworkSyntaxError as exc:
        raise ValueError(
            f"{value!r} is not an IP network: {exc} (allowed: {NETWORK_FORMS})"
        ) from None


def _positive_duration(value: float) -> float:
    if value < 0:
        raise ValueError("must be zero or more seconds")
    return value


Listen = Annotated[
    ListenAddress, PlainValidator(parse_listen_address), PlainSerializer(str, return_type=str)
]
Network = Annotated[IPNetwork, PlainValidator(parse_network), PlainSerializer(str, return_type=str)]
Seconds = Annotated[float, AfterValidator(_positive_duration)]
