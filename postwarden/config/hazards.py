"""Settings that reopen a hole the defaults close, each a small named rule.

`config_hazards(cfg)` lists them for `postwarden config check`. Two kinds:

- *refused* (`refuse=True`): the setting lets strangers use the server. The config model
  itself rejects these (NetworkConfig calls `open_relay_networks`), so no daemon and no
  command runs with them; `config check` reports them as errors naming the key.
- *warned*: a protection for our own users or mail is off. An operator may choose that
  knowingly (a client that cannot be fixed), so everything still runs; `config check`
  prints a warning naming the key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from postwarden.config.types import IPNetwork

if TYPE_CHECKING:
    from postwarden.config.model import Config


@dataclass(frozen=True)
class Hazard:
    """One risky setting: the dotted key, what it exposes, and whether it is refused."""

    key: str
    message: str
    refuse: bool


# Address space that belongs to this host or site: trusting it relays for nobody outside.
PRIVATE_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",  # loopback
        "10.0.0.0/8",  # RFC 1918
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",  # link-local
        "::1/128",
        "fc00::/7",  # unique local (RFC 4193)
        "fe80::/10",  # link-local
    )
)
# IPv6 prefixes that carry every IPv4 address inside them: trusting all of one trusts all of
# IPv4 (an IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d).
_IPV4_EMBEDDING = tuple(ipaddress.IPv6Network(n) for n in ("::ffff:0:0/96", "64:ff9b::/96"))
# A trusted network with public addresses wider than this is a provider's worth of strangers
# (an IPv4 /16 is 65,536 hosts; an IPv6 /32 is a whole ISP allocation): an open relay.
MAX_PUBLIC_PREFIX = {4: 16, 6: 32}


def _as_ipv4(net: IPNetwork) -> IPNetwork:
    """The IPv4 networks an IPv4-mapped or NAT64 IPv6 network stands for (else `net`)."""
    if isinstance(net, ipaddress.IPv6Network):
        for embedding in _IPV4_EMBEDDING:
            if net.supernet_of(embedding):
                return ipaddress.IPv4Network("0.0.0.0/0")
            if net.subnet_of(embedding):
                low = int(net.network_address) & 0xFFFFFFFF
                return ipaddress.IPv4Network((low, net.prefixlen - 96))
    return net


def has_public_addresses(net: IPNetwork) -> bool:
    """True unless `net` lies wholly inside loopback, RFC 1918, link-local or ULA space."""
    net = _as_ipv4(net)
    return not any(
        net.version == private.version and net.subnet_of(private)  # type: ignore[arg-type]  # same version: checked first
        for private in PRIVATE_NETWORKS
    )


def is_open_relay_network(net: IPNetwork) -> bool:
    """A public network so wide that trusting it lets strangers relay (0.0.0.0/0, ::/0, …)."""
    net = _as_ipv4(net)
    return has_public_addresses(net) and net.prefixlen < MAX_PUBLIC_PREFIX[net.version]


def open_relay_networks(trusted: Sequence[IPNetwork]) -> Hazard | None:
    """Refused: network.trusted holds the public internet (or a provider's share of it)."""
    wide = [
        f"{n} (= {_as_ipv4(n)} as IPv4-mapped/NAT64 addresses)"
        if n.prefixlen >= MAX_PUBLIC_PREFIX[n.version]
        else str(n)
        for n in trusted
        if is_open_relay_network(n)
    ]
    if not wide:
        return None
    return Hazard(
        "network.trusted",
        f"{', '.join(wide)} would trust public address space wider than IPv4 /16 or "
        "IPv6 /32: every host there could relay mail through this server and have it "
        "DKIM-signed without logging in (an open relay); list only your own networks",
        refuse=True,
    )


def _open_relay(cfg: Config) -> Iterable[Hazard]:
    hazard = open_relay_networks(cfg.network.trusted)
    return [hazard] if hazard else []


def _public_trusted_networks(cfg: Config) -> Iterable[Hazard]:
    if cfg.mail.listen != "all":
        return []  # only local clients reach Postfix: a public entry matches nobody
    public = [
        str(n)
        for n in cfg.network.trusted
        if has_public_addresses(n) and not is_open_relay_network(n)
    ]
    if not public:
        return []
    return [
        Hazard(
            "network.trusted",
            f"{', '.join(public)} holds public addresses and mail.listen = 'all': every "
            "host there relays and gets mail signed without logging in or any check; "
            "make sure each one is yours",
            refuse=False,
        )
    ]


def _smuggling_protection_off(cfg: Config) -> Iterable[Hazard]:
    if cfg.mail.smuggling_protection:
        return []
    return [
        Hazard(
            "mail.smuggling_protection",
            "false lets a client smuggle a second message past the checks with bare "
            "line endings or early pipelining (SMTP smuggling), e.g. one that forges a "
            "sender in our domains",
            refuse=False,
        )
    ]


def _forged_local_senders_allowed(cfg: Config) -> Iterable[Hazard]:
    if cfg.mail.reject_forged_local_senders:
        return []
    return [
        Hazard(
            "mail.reject_forged_local_senders",
            "false lets anyone on port 25 send without logging in as an address of "
            "our own mail domains",
            refuse=False,
        )
    ]


def _clear_text_imap_pop3_login(cfg: Config) -> Iterable[Hazard]:
    mail = cfg.mail
    plain = ((mail.imap_port, mail.imap), (mail.pop3_port, mail.pop3))
    ports = [str(port) for port, enabled in plain if enabled]
    if mail.imap_pop3_require_tls or not ports:
        return []
    # In gateway mode those passwords are the backend's, passed through: refused there.
    gateway = cfg.gateway.enabled
    return [
        Hazard(
            "mail.imap_pop3_require_tls",
            f"false allows IMAP/POP3 logins without TLS on port{'s' * (len(ports) > 1)} "
            f"{', '.join(ports)}: "
            "passwords may cross the network unencrypted"
            + (" (in gateway mode, the backend's passwords)" if gateway else ""),
            refuse=gateway,
        )
    ]


def _unlimited_auth_attempts(cfg: Config) -> Iterable[Hazard]:
    if cfg.mail.auth_rate_limit or not cfg.mail.sasl:
        return []
    return [
        Hazard(
            "mail.auth_rate_limit",
            "0 leaves SMTP AUTH unlimited: password guessing on 587/465 is not slowed",
            refuse=False,
        )
    ]


def _forged_from_passes_unsigned(cfg: Config) -> Iterable[Hazard]:
    if cfg.milterd.from_mismatch != "unsigned":
        return []
    return [
        Hazard(
            "milterd.from_mismatch",
            "'unsigned' sends on a logged-in user's message whose From: is an address "
            "that login may not use (only unsigned): any user can still pose as another",
            refuse=False,
        )
    ]


def _policy_outage_accepts_unchecked(cfg: Config) -> Iterable[Hazard]:
    if cfg.policyd.unreachable_action != "DUNNO":
        return []
    return [
        Hazard(
            "policyd.unreachable_action",
            "'DUNNO' accepts mail Postfix could not ask policyd about: while policyd is "
            "down or frozen, senders on the forbidden lists, DNSBL-listed clients and SPF "
            "failures get in unchecked (DEFER_IF_PERMIT makes that mail wait instead)",
            refuse=False,
        )
    ]


def _policy_connections_below_smtp_sessions(cfg: Config) -> Iterable[Hazard]:
    # Every port-25 smtpd process holds one connection to policyd; past policyd's limit the
    # rest are refused, and their mail waits (policyd.unreachable_action) for no reason.
    if cfg.policyd.max_connections >= cfg.mail.max_connections:
        return []
    return [
        Hazard(
            "policyd.max_connections",
            f"{cfg.policyd.max_connections} is below mail.max_connections "
            f"({cfg.mail.max_connections}): each port-25 session holds one policyd "
            "connection, so sessions beyond it wait (450) although nothing failed",
            refuse=False,
        )
    ]


def _relay_password_in_clear(cfg: Config) -> Iterable[Hazard]:
    return [
        Hazard(
            f"mail.relays[{i}].starttls",
            f"'disabled' on relay {relay.name!r}, which has a username: its password "
            "crosses the network unencrypted",
            refuse=False,
        )
        for i, relay in enumerate(cfg.mail.relays)
        if relay.username is not None and relay.tls_level == "none"
    ]


def _recipients_checked_by_cached_probe(cfg: Config) -> Iterable[Hazard]:
    # Without the live `mailboxes` map Postfix falls back to its LMTP verify probe, whose
    # answers it keeps for a minute: a deleted user is accepted, then bounced, meanwhile.
    # Only one of the two set is a mistake; neither is a Postfix that postwarden only
    # plugs into (the quick start), whose recipients are the operator's own business.
    served, asked = cfg.policyd.aliases_listen is not None, cfg.policyd.mailbox_lmtp is not None
    if served == asked:
        return []
    key = "policyd.mailbox_lmtp" if served else "policyd.aliases_listen"
    return [
        Hazard(
            key,
            "recipients are checked by Postfix's cached LMTP probe, not live: a deleted "
            "mailbox is still accepted (then bounced) for up to a minute; set both "
            "policyd.aliases_listen and policyd.mailbox_lmtp",
            refuse=False,
        )
    ]


def _mailbox_lmtp_without_a_listener(cfg: Config) -> Iterable[Hazard]:
    # The rendered dovecot.conf opens a unix listener at this path for policyd; Dovecot's
    # own LMTP socket inside Postfix's private/ (0700 postfix) is out of policyd's reach.
    target = cfg.policyd.mailbox_lmtp
    if target is None:
        return []
    if target.kind != "unix":
        why = "an inet address gets no Dovecot listener rendered: open one by hand"
    elif "/private/" in target.path:
        why = "Postfix's private/ directory is closed to policyd's user"
    else:
        return []
    return [
        Hazard(
            "policyd.mailbox_lmtp",
            f"{why}, or every recipient of our domains is deferred (451); "
            'use a unix path of its own, e.g. "unix:/run/dovecot/postwarden-lmtp"',
            refuse=False,
        )
    ]


def _domain_grant_outside_our_domains(cfg: Config) -> Iterable[Hazard]:
    ours = {*cfg.mail.local_domains, *(d.domain for d in cfg.mail.relay_domains)}
    return [
        Hazard(
            f"mail.sender_grants.{login!r}",
            f"{grant!r} is not one of our domains: {login} may send as anyone there",
            refuse=False,
        )
        for login, grants in cfg.mail.sender_grants.items()
        for grant in grants
        if grant.startswith("@") and grant[1:] not in ours
    ]


def _gateway_certificate_name_unchecked(cfg: Config) -> Iterable[Hazard]:
    # Dovecot checks a backend's certificate against the host it connects to: the login
    # proxy can be given an address to connect to (hostip) and a name to check, imapc (SMTP
    # logins) cannot. Either way the connection fails closed; this says why beforehand.
    gw = cfg.gateway
    if not gw.enabled or gw.certificate_name is None:
        return []
    out = []
    for name, service in gw.services():
        if service.security == "none" or service.host == gw.certificate_name:
            continue
        is_address = service.host_is_address
        if name in ("imap", "pop3") and not is_address:
            out.append(
                Hazard(
                    f"gateway.{name}.host",
                    f"Dovecot's proxy checks the backend's certificate against {service.host}, "
                    f"not gateway.certificate_name {gw.certificate_name}: give the host as an "
                    "address, or leave certificate_name unset",
                    refuse=False,
                )
            )
        if name == "imap" and is_address:
            out.append(
                Hazard(
                    "gateway.imap.host",
                    "SMTP logins are checked by Dovecot's imapc, which verifies the backend's "
                    f"IMAP certificate against {service.host} itself, not "
                    f"{gw.certificate_name}: the certificate must carry that address, or name "
                    "the host by its certificate name",
                    refuse=False,
                )
            )
    return out


def _gateway_without_imap(cfg: Config) -> Iterable[Hazard]:
    gw = cfg.gateway
    if not gw.enabled or gw.imap is not None:
        return []
    return [
        Hazard(
            "gateway.imap",
            "unset: SMTP logins are checked at the backend's IMAP, so without it the "
            "backend's users can neither send through the gateway nor read mail (inbound "
            "filtering only)",
            refuse=False,
        )
    ]


def _gateway_service_unencrypted(cfg: Config) -> Iterable[Hazard]:
    return [
        Hazard(
            f"gateway.{name}.security",
            "'none' sends logins and mail to the backend in the clear: for tests only",
            refuse=False,
        )
        for name, service in cfg.gateway.services()
        if cfg.gateway.enabled and service.security == "none"
    ]


RULES: tuple[Callable[[Config], Iterable[Hazard]], ...] = (
    _open_relay,
    _public_trusted_networks,
    _smuggling_protection_off,
    _forged_local_senders_allowed,
    _clear_text_imap_pop3_login,
    _unlimited_auth_attempts,
    _forged_from_passes_unsigned,
    _policy_outage_accepts_unchecked,
    _policy_connections_below_smtp_sessions,
    _relay_password_in_clear,
    _recipients_checked_by_cached_probe,
    _mailbox_lmtp_without_a_listener,
    _domain_grant_outside_our_domains,
    _gateway_without_imap,
    _gateway_service_unencrypted,
    _gateway_certificate_name_unchecked,
)


def config_hazards(cfg: Config) -> list[Hazard]:
    """Every setting of `cfg` that reopens a hole, refusals first, in rule order."""
    found = [hazard for rule in RULES for hazard in rule(cfg)]
    return sorted(found, key=lambda h: not h.refuse)
