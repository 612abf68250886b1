"""Value types shared by the config sections: listen addresses, networks, durations."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, PlainSerializer, PlainValidator

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ListenAddress:
    """Where a daemon listens: `unix:/path` or `inet:host:port` (IPv6 host in brackets)."""

    kind: str  # "unix" or "inet"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"


def parse_listen_address(value: object) -> ListenAddress:
    """Parse `unix:/path` or `inet:host:port`; raise ValueError saying what is allowed."""
    if isinstance(value, ListenAddress):
        return value
    if not isinstance(value, str):
        raise ValueError('must be a string like "unix:/run/x.sock" or "inet:127.0.0.1:10040"')
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError("a unix socket path must be absolute")
        return ListenAddress("unix", path=path)
    if value.startswith("inet:"):
        rest = value[len("inet:") :]
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ValueError('must look like "inet:127.0.0.1:10040" or "inet:[::1]:10040"')
        host = host.strip("[]")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError("port must be 1..65535")
        return ListenAddress("inet", host=host, port=port)
    raise ValueError('must start with "unix:" or "inet:"')


def parse_network(value: object) -> IPNetwork:
    """A network as CIDR (`10.0.0.0/8`), `addr/netmask`, `addr:netmask` or a bare address."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string such as 192.168.0.0/16 or 10.0.0.5/255.255.255.255")
    text = value.strip()
    if text.count(":") == 1 and "." in text:  # IPv4 addr:mask as in the seed's import format
        text = text.replace(":", "/")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP network (use CIDR like 192.168.0.0/16, "
            "addr/mask like 10.0.0.5/255.255.255.255, or an IPv6 prefix like 2001:db8::/32)"
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
