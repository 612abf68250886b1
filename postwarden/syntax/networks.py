"""The one grammar of IP networks: CIDR, `addr/netmask`, `addr:netmask`, IPv4 wildcards.

The seed's list and import formats, `[network] trusted`, `[mail.connection_control]` and the
DNSBL return-code filters all read networks through `parse_network`, so a network one of
them accepts is a network every consumer accepts (docs/ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import ipaddress
import re

from postwarden.syntax.ip_addresses import IPAddress, unmapped

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NETWORK_FORMS = (
    "an IPv4/IPv6 address, a network (10.0.0.0/8, 2001:db8::/32), "
    "addr/mask or addr:mask (192.168.2.0:255.255.255.0) or an IPv4 wildcard (192.168.1.*)"
)
_V4_BITS = 32
_V6_BITS = 128
_V4_MASKS = tuple(((1 << _V4_BITS) - 1) ^ ((1 << (_V4_BITS - n)) - 1) for n in range(33))
DOTTED_QUAD = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")


class NetworkSyntaxError(ValueError):
    """Text in no network form; the message is the reason alone (callers add the forms)."""


def looks_like_addr_mask(text: str) -> bool:
    """`192.168.2.0:255.255.255.0`: an IPv4 address, a colon, then a dotted netmask."""
    return ":" in text and "." in text and bool(DOTTED_QUAD.fullmatch(text.partition(":")[0]))


def parse_ip_address(text: str) -> IPAddress:
    """One IP address, exactly as written (no brackets, no zone); NetworkSyntaxError else."""
    if "%" in text:
        raise NetworkSyntaxError("an IPv6 zone (%...) has no meaning for a remote client")
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise NetworkSyntaxError(f"not a valid IP address: {exc}") from None


def unmapped_network(network: IPNetwork) -> IPNetwork:
    """An IPv6 network inside ::ffff:0:0/96 as the IPv4 network it carries; else unchanged."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        address = unmapped(network.network_address)
        if address.version == 4:
            return ipaddress.IPv4Network((int(address), network.prefixlen - 96))
    return network


def _network(address: IPAddress, prefix: int) -> IPNetwork:
    return unmapped_network(ipaddress.ip_network((address, prefix), strict=False))


def netmask_length(mask_text: str) -> int:
    """The prefix length of a dotted IPv4 netmask (`255.255.255.0` -> 24), contiguous only."""
    try:
        mask = int(ipaddress.IPv4Address(mask_text))
    except ValueError:
        raise NetworkSyntaxError(f"{mask_text} is not a valid netmask") from None
    length = _V4_BITS - (((1 << _V4_BITS) - 1) ^ mask).bit_length()
    if _V4_MASKS[length] != mask:
        raise NetworkSyntaxError(f"netmask {mask_text} is not contiguous (ones then zeros)")
    return length


def _cidr(text: str) -> IPNetwork:
    addr_text, _, prefix_text = text.partition("/")
    address = parse_ip_address(addr_text)
    bits = _V4_BITS if address.version == 4 else _V6_BITS
    if prefix_text.isascii() and prefix_text.isdigit() and len(prefix_text) <= 3:
        prefix = int(prefix_text)
    elif address.version == 4 and DOTTED_QUAD.fullmatch(prefix_text):
        prefix = netmask_length(prefix_text)
    else:
        raise NetworkSyntaxError(f"the prefix length after '/' must be a number 0..{bits}")
    if prefix > bits:
        raise NetworkSyntaxError(f"prefix length {prefix} is longer than {bits} bits")
    return _network(address, prefix)


def _addr_mask(text: str) -> IPNetwork:
    addr_text, _, mask_text = text.partition(":")
    address = parse_ip_address(addr_text)
    if not DOTTED_QUAD.fullmatch(mask_text):
        raise NetworkSyntaxError("addr:mask needs a dotted netmask such as 255.255.255.0")
    return _network(address, netmask_length(mask_text))


def _wildcard(text: str) -> IPNetwork:
    parts = text.split(".")
    if len(parts) > 4:
        raise NetworkSyntaxError("an IPv4 wildcard has at most four octets")
    octets: list[int] = []
    for index, part in enumerate(parts):
        if part == "*":
            if any(later != "*" for later in parts[index + 1 :]):
                raise NetworkSyntaxError("a '*' may only stand for trailing octets (192.168.*)")
            break
        if "*" in part:
            raise NetworkSyntaxError("a '*' must be a whole octet (192.168.1.*)")
        if not (part.isascii() and part.isdigit()) or len(part) > 3 or int(part) > 255:
            raise NetworkSyntaxError(f"octet {part!r} is not a number 0..255")
        octets.append(int(part))
    else:  # pragma: no cover - only reached without a '*', which the caller rules out
        raise NetworkSyntaxError("an IPv4 wildcard must end with '*'")
    if not octets:
        raise NetworkSyntaxError("a lone '*' matches every address; write 0.0.0.0/0 if you mean it")
    address = ipaddress.IPv4Address(bytes([*octets, 0, 0, 0, 0][:4]))
    return _network(address, 8 * len(octets))


def parse_network(text: str) -> IPNetwork:
    """A network in any of NETWORK_FORMS, host bits cleared, IPv4-mapped IPv6 as IPv4."""
    entry = text.strip()
    if not entry:
        raise NetworkSyntaxError("empty")
    if "*" in entry:
        return _wildcard(entry)
    if "/" in entry:
        return _cidr(entry)
    if looks_like_addr_mask(entry):
        return _addr_mask(entry)
    address = unmapped(parse_ip_address(entry))
    return ipaddress.ip_network(address)


def parse_ipv4_range(text: str) -> tuple[int, int]:
    """A DNSBL return-code filter as an inclusive integer range.

    `127.0.0.2`, a range `127.0.0.2-127.0.0.11`, or any IPv4 network form
    (`127.0.0.0/24`, `127.0.0.*`). DNSBL answers are A records, so IPv6 is refused.
    """
    low_text, dash, high_text = text.strip().partition("-")
    if dash:
        low, high = (_ipv4(part) for part in (low_text, high_text))
        return min(low, high), max(low, high)
    network = parse_network(text)
    if network.version != 4:
        raise NetworkSyntaxError("a DNSBL answers with IPv4 addresses (A records) only")
    return int(network.network_address), int(network.broadcast_address)


def _ipv4(text: str) -> int:
    address = unmapped(parse_ip_address(text.strip()))
    if address.version != 4:
        raise NetworkSyntaxError("a DNSBL answers with IPv4 addresses (A records) only")
    return int(address)
