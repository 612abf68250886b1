"""Resolvers built from [dns]: nameserver strings with ports, timeouts, no search domains."""

from __future__ import annotations

import pytest

from postwarden.config.model import DnsConfig
from postwarden.dns.resolver import make_resolver, make_sync_resolver, parse_nameserver


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.53", ("127.0.0.53", 53)),
        ("127.0.0.53:5353", ("127.0.0.53", 5353)),
        ("::1", ("::1", 53)),
        ("[2001:db8::1]:5300", ("2001:db8::1", 5300)),
    ],
)
def test_nameserver_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["resolver.example", "127.0.0.1:0", "127.0.0.1:70000"])
def test_bad_nameserver_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


@pytest.mark.parametrize("factory", [make_resolver, make_sync_resolver])
def test_configured_servers_ports_and_time_bound(factory: object) -> None:
    cfg = DnsConfig(nameservers=["127.0.0.53:5353", "[::1]:5300"], timeout=3)
    resolver = factory(cfg)  # type: ignore[operator]
    servers = [(ns.address, ns.port) for ns in resolver.nameservers]
    assert servers == [("127.0.0.53", 5353), ("::1", 5300)]
    assert resolver.lifetime == 3
    assert resolver.timeout == 1.5  # each server gets its share of the query's time
    assert resolver.search == []
    assert resolver.use_search_by_default is False
