"""The one grammar of each network endpoint a config names.

- listen addresses: `unix:/abs/path` or `inet:host:port` (IPv6 host in brackets);
- host and port: `127.0.0.1:9641` or `[::1]:9641` (the metrics address);
- nameservers: `IP`, `IPv4:port` or `[IPv6]:port` (an address, never a network or a name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postwarden.syntax.domain_names import DomainNameError, parse_domain_name
from postwarden.syntax.networks import NetworkSyntaxError, parse_ip_address

DNS_PORT = 53
_BRACKETED = re.compile(r"\[([^\[\]]*)\]:([^:]*)")


class EndpointError(ValueError):
    """Text in no endpoint form; the message says what is allowed."""


def parse_port(text: str) -> int:
    """A TCP/UDP port 1..65535 written in ASCII digits."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise EndpointError(f"port must be 1..65535, not {text!r}")
    return int(text)


def _ip_literal(text: str) -> str:
    try:
        return str(parse_ip_address(text))
    except NetworkSyntaxError as exc:
        raise EndpointError(str(exc)) from None


def split_host_port(text: str) -> tuple[str, str]:
    """(host, port text) of `host:port` or `[v6]:port`, brackets removed."""
    bracketed = _BRACKETED.fullmatch(text)
    if bracketed:
        return bracketed.group(1), bracketed.group(2)
    host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host:
        raise EndpointError('must look like "127.0.0.1:9641" or "[::1]:9641"')
    return host, port


def parse_ip_port(text: str) -> tuple[str, int]:
    """`IPv4:port` or `[IPv6]:port` as (ip, port), the IP in its normal spelling."""
    host, port = split_host_port(text)
    return _ip_literal(host), parse_port(port)


def parse_nameserver(text: str) -> tuple[str, int]:
    """`IP`, `IPv4:port` or `[IPv6]:port` as (ip, port); port 53 when none is given."""
    try:
        if text.startswith("[") and text.endswith("]"):
            return _ip_literal(text[1:-1]), DNS_PORT
        if text.startswith("[") or text.count(":") == 1:
            return parse_ip_port(text)
        return _ip_literal(text), DNS_PORT
    except EndpointError as exc:
        raise EndpointError(
            f"{exc}; a nameserver is one IP address: IP, IPv4:port or [IPv6]:port "
            "(not a network or a host name)"
        ) from None


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


def parse_listen_address(text: str) -> ListenAddress:
    """`unix:/path` or `inet:host:port` (host an IP or a host name); EndpointError else."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise EndpointError("a unix socket path must be absolute")
        if "\0" in path:
            raise EndpointError("a unix socket path cannot hold a NUL character")
        return ListenAddress("unix", path=path)
    if text.startswith("inet:"):
        rest = text[len("inet:") :]
        bracketed = _BRACKETED.fullmatch(rest)
        if bracketed:
            host, port_text = _ip_literal(bracketed.group(1)), bracketed.group(2)
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep or not host:
                raise EndpointError('must look like "inet:127.0.0.1:10040" or "inet:[::1]:10040"')
            host = _listen_host(host)
        return ListenAddress("inet", host=host, port=parse_port(port_text))
    raise EndpointError('must start with "unix:" or "inet:"')


def _listen_host(text: str) -> str:
    try:
        return str(parse_ip_address(text))
    except NetworkSyntaxError:
        pass
    try:
        return parse_domain_name(text)
    except DomainNameError as exc:
        raise EndpointError(f"{text!r} is neither an IP address nor a host name: {exc}") from None
