"""Resolvers built from `[dns]`: the one place that turns the config into dnspython objects.

DNSBL queries use the asyncio resolver; SPF (pyspf, in worker threads) and the CLI use the
synchronous one. Both ask exactly the configured nameservers (with their ports), or the
system's /etc/resolv.conf when none is configured.
"""

from __future__ import annotations

import dns.asyncresolver
import dns.nameserver
import dns.resolver

from postwarden.config.model import DnsConfig
from postwarden.syntax.endpoints import DNS_PORT, parse_nameserver

# Re-exported: the config validates `[dns] nameservers` with this same parser.
__all__ = ["DNS_PORT", "make_resolver", "make_sync_resolver", "parse_nameserver"]


def _configure(resolver: dns.resolver.BaseResolver, cfg: DnsConfig) -> None:
    if cfg.nameservers:
        servers: list[dns.nameserver.Nameserver] = []
        for item in cfg.nameservers:
            ip, port = parse_nameserver(item)
            servers.append(dns.nameserver.Do53Nameserver(ip, port))
        resolver.nameservers = servers
    # `timeout` in the config bounds one whole query; every configured server gets a fair
    # share of it, so a dead first server does not use up the time of the others.
    count = max(1, len(resolver.nameservers))
    resolver.lifetime = cfg.timeout
    resolver.timeout = cfg.timeout / count
    # Every name we ask is absolute (DNSBL zones, SPF domains): never append search domains.
    resolver.use_search_by_default = False
    resolver.search = []


def make_resolver(cfg: DnsConfig) -> dns.asyncresolver.Resolver:
    """An asyncio resolver asking the configured nameservers (or resolv.conf's)."""
    resolver = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
    _configure(resolver, cfg)
    return resolver


def make_sync_resolver(cfg: DnsConfig) -> dns.resolver.Resolver:
    """The same, blocking: for code that runs in worker threads (pyspf) or the CLI."""
    resolver = dns.resolver.Resolver(configure=not cfg.nameservers)
    _configure(resolver, cfg)
    return resolver
