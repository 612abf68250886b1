"""Client IP addresses as every check sees them: parsed once, IPv4-mapped IPv6 as IPv4.

Postfix reports an IPv4 client on a dual-stack socket as `::ffff:192.0.2.1`; lists,
greylisting, DNSBL and SPF must all treat it as `192.0.2.1`, so the rule lives here once.
"""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped IPv6 address carries; any other address unchanged."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_client_ip(text: str) -> IPAddress | None:
    """A client address (`[...]` tolerated), IPv4-mapped as IPv4; None if it is not an IP."""
    try:
        return unmapped(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return None
