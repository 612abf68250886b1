"""The one grammar per endpoint: listen addresses, host:port, nameservers."""

from __future__ import annotations

import pytest

from policyd.metrics import parse_metrics_listen
from postwarden.dns.resolver import parse_nameserver as resolver_parse_nameserver
from postwarden.syntax.endpoints import (
    EndpointError,
    ListenAddress,
    parse_ip_port,
    parse_listen_address,
    parse_nameserver,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.53", ("127.0.0.53", 53)),
        ("127.0.0.53:5353", ("127.0.0.53", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[2001:DB8::1]:5300", ("2001:db8::1", 5300)),
    ],
)
def test_nameserver_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected
    assert resolver_parse_nameserver is parse_nameserver  # the resolver uses this very parser


@pytest.mark.parametrize(
    "text", ["10.0.0.0/8", "resolver.example", "127.0.0.1:0", "[::1]:x", "fe80::1%eth0", ""]
)
def test_a_nameserver_is_one_address(text: str) -> None:
    with pytest.raises(EndpointError, match="a nameserver is one IP address"):
        parse_nameserver(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9641", ("127.0.0.1", 9641)), ("[::1]:9641", ("::1", 9641))],
)
def test_ip_port_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_ip_port(text) == expected
    assert parse_metrics_listen(text) == expected


@pytest.mark.parametrize(
    "text", ["::1:9641", "localhost:9641", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:٩٦٤١"]
)
def test_ip_port_refusals(text: str) -> None:
    with pytest.raises(EndpointError):
        parse_ip_port(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/p.sock", ListenAddress("unix", path="/run/p.sock")),
        ("inet:127.0.0.1:10040", ListenAddress("inet", host="127.0.0.1", port=10040)),
        ("inet:[::1]:10040", ListenAddress("inet", host="::1", port=10040)),
        ("inet:Localhost:10040", ListenAddress("inet", host="localhost", port=10040)),
    ],
)
def test_listen_address_forms(text: str, expected: ListenAddress) -> None:
    assert parse_listen_address(text) == expected
    assert parse_listen_address(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("tcp:1.2.3.4:5", "must start with"),
        ("unix:rel.sock", "absolute"),
        ("inet:127.0.0.1:99999", "1..65535"),
        ("inet:a b:10", "nor a host name"),
        ("inet:[::1", "nor a host name"),
    ],
)
def test_listen_address_refusals(text: str, reason: str) -> None:
    with pytest.raises(EndpointError, match=reason):
        parse_listen_address(text)
