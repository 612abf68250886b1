"""The one config model: every daemon setting and every rendered Postfix/Dovecot file comes from it.

Each section is a frozen pydantic model that forbids unknown keys, so a typo is an error
naming the key rather than a silently ignored setting. Defaults make an empty file run.

Contract: docs/ARCHITECTURE.md, "Layers".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)

from postwarden.config.gateway import GatewayConfig
from postwarden.config.hazards import open_relay_networks
from postwarden.config.mail import Domain, MailConfig, check_domain
from postwarden.config.types import (
    IPNetwork,
    Listen,
    ListenAddress,
    Network,
    Seconds,
    parse_network,
)
from postwarden.syntax.domain_names import MAX_NAME, DomainNameError, check_labels
from postwarden.syntax.endpoints import parse_ip_port, parse_nameserver
from postwarden.syntax.networks import parse_ipv4_range


def _checked_by(parse: Callable[[str], object]) -> Callable[[object], str]:
    """A validator keeping the text as written once `parse` (the consumer's parser) took it."""

    def check(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return value

    return check


# Kept as text, validated by the parser the consumer runs on it (postwarden.dns.resolver,
# postwarden.policy.dnsbl), so each item's error names its own key (`dns.nameservers[0]`).
Nameserver = Annotated[str, PlainValidator(_checked_by(parse_nameserver))]
DnsblCode = Annotated[str, PlainValidator(_checked_by(parse_ipv4_range))]


class Section(BaseModel):
    """Base for every config table: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StoreConfig(Section):
    """Where lists, aliases and greylist state live."""

    # sqlite:///abs/path.db, redis://host:port/db, rediss://…, redis+sentinel://h1:p,h2:p/master/db
    # or redis+cluster://host:port
    url: str = "sqlite:///var/lib/postwarden/state.db"
    # How often a daemon asks the store whether the lists changed (seconds).
    refresh_interval: Annotated[float, Field(gt=0, le=1.0)] = 0.5
    # Store operations slower than this count as failures (the safe default is answered).
    timeout: Annotated[float, Field(gt=0)] = 1.0

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        allowed = ("sqlite://", "redis://", "rediss://", "redis+sentinel://", "redis+cluster://")
        if not value.startswith(allowed):
            raise ValueError(f"must start with one of {', '.join(allowed)}")
        return value


PolicyAction = Literal["DUNNO", "DEFER_IF_PERMIT"]


def _loopback_metrics(value: str) -> str:
    # Metrics reveal traffic patterns: they are served on loopback only.
    host, _ = parse_ip_port(value)  # the grammar postwarden.daemon.metrics_http serves with
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError("must be a loopback address (127.0.0.0/8 or [::1]) and a port")
    return value


# Prometheus metrics on a loopback HTTP port, e.g. "127.0.0.1:9641" (policyd, milterd).
MetricsListen = Annotated[str, AfterValidator(_loopback_metrics)]


class PolicydConfig(Section):
    """The Postfix policy server."""

    listen: list[Listen] = Field(
        default_factory=lambda: [ListenAddress("unix", path="/run/postwarden/policyd.sock")],
        min_length=1,
    )
    # Worker processes sharing the listening sockets; 0 means one per CPU core.
    workers: Annotated[int, Field(ge=0, le=64)] = 1
    # What a running policyd answers when a check fails inside it (the store or DNS
    # unreachable, a request over request_timeout).
    default_action: PolicyAction = "DUNNO"
    # What Postfix does when it cannot reach policyd at all (down, frozen, socket gone):
    # DEFER_IF_PERMIT makes the mail wait (4xx) unless something else refuses it;
    # DUNNO accepts it unchecked (config check warns).
    unreachable_action: PolicyAction = "DEFER_IF_PERMIT"
    # Unix socket permissions (Postfix's smtpd must be able to connect).
    socket_mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] = "0660"
    socket_group: str | None = None
    max_connections: Annotated[int, Field(ge=1)] = 1000
    # Seconds of silence before a connection is closed (also Postfix's policy max_idle).
    idle_timeout: Annotated[float, Field(gt=0)] = 300.0
    # Total time one request may take before the default action is answered (also how long
    # Postfix waits for policyd). Longer than dnsbl.budget + spf.timeout (2 + 20 s) with room.
    request_timeout: Annotated[float, Field(gt=0)] = 30.0
    # Prometheus metrics on a loopback HTTP port, e.g. "127.0.0.1:9641"; off when unset.
    metrics_listen: MetricsListen | None = None
    # Forwarding aliases served to Postfix as a socketmap (virtual_alias_maps =
    # socketmap:<this>:aliases), so alias edits apply without a reload; unset: not served.
    aliases_listen: Listen | None = None
    # Dovecot's LMTP socket, asked live (one RCPT probe, no cache) whether a mailbox exists:
    # serves the `mailboxes` socketmap on aliases_listen (Postfix's virtual_mailbox_maps, so
    # an unknown or deleted user is refused at RCPT at once). Unset: that map is not served.
    mailbox_lmtp: Listen | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class MilterdConfig(Section):
    """The DKIM milter."""

    listen: list[Listen] = Field(
        default_factory=lambda: [ListenAddress("unix", path="/run/postwarden/milterd.sock")],
        min_length=1,
    )
    socket_mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] = "0660"
    socket_group: str | None = None
    # What happens to a message when signing/verifying fails internally.
    on_error: Literal["accept", "tempfail"] = "accept"
    # The authserv-id in Authentication-Results; defaults to mail.hostname.
    authserv_id: str | None = None
    # A logged-in user's message whose From: address that login may not use
    # (postwarden.policy.sender_identity): "reject" it (550 5.7.1 at end of data) or pass it on
    # "unsigned" (logged). Mail from trusted networks without a login is signed as before.
    from_mismatch: Literal["reject", "unsigned"] = "reject"
    # Prometheus metrics on a loopback HTTP port, e.g. "127.0.0.1:9642", summed over the
    # listener processes; off when unset.
    metrics_listen: MetricsListen | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class FrontdConfig(Section):
    """The always-up front ends (`postwarden frontd`) on the sockets Postfix talks to.

    Postfix gives up a whole session when a milter or its SASL server cannot be reached
    at the start: STARTTLS answers 454 and AUTH is not offered (milter), or smtpd dies
    with "no SASL authentication mechanisms" (Dovecot). frontd holds those sockets, passes
    every byte through while milterd and Dovecot answer, and otherwise answers itself:
    451 at MAIL (milter) and a dropped AUTH that Postfix reports as 454 4.7.0 (SASL).
    """

    enabled: bool = False
    # Postfix's smtpd_milters and non_smtpd_milters point here; frontd forwards to
    # milterd.listen[0].
    milter_listen: Listen = Field(
        default_factory=lambda: ListenAddress("unix", path="/run/postwarden/milter-front.sock")
    )
    # Postfix's smtpd_sasl_path points here (unset: Postfix talks to Dovecot directly).
    sasl_listen: Listen | None = None
    # Dovecot's auth listener for Postfix: dovecot.conf is rendered with it, and frontd
    # forwards to it.
    sasl_upstream: Listen | None = None
    # How long the milter front end waits for milterd to answer a new connection's first
    # packet before answering itself: a frozen milterd must not hold each session for
    # Postfix's milter_connect_timeout.
    upstream_timeout: Annotated[float, Field(gt=0, le=30)] = 2.0
    socket_mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] = "0660"
    socket_group: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _sasl_pair(self) -> FrontdConfig:
        if (self.sasl_listen is None) != (self.sasl_upstream is None):
            raise ValueError("frontd.sasl_listen and frontd.sasl_upstream are set together")
        for name in ("milter_listen", "sasl_listen", "sasl_upstream"):
            value = getattr(self, name)
            if name != "milter_listen" and value is not None and value.kind != "unix":
                raise ValueError(f"frontd.{name} must be a unix: socket (Dovecot's auth protocol)")
        return self


class DnsConfig(Section):
    """The resolver used for DNSBL, SPF and DKIM lookups."""

    # "IP" or "IP:port" ("[v6]:port"); empty means the system's /etc/resolv.conf.
    nameservers: list[Nameserver] = Field(default_factory=list)
    # Per-query timeout in seconds.
    timeout: Annotated[float, Field(gt=0, le=30)] = 2.0


class GreylistingConfig(Section):
    """Greylisting (RFC 6647) of inbound mail."""

    enabled: bool = True
    # A triplet seen for the first time is deferred for this long (seconds).
    delay: Seconds = 300
    # After the delay the sender must retry within this window, else it starts again.
    retry_window: Seconds = 2 * 86400
    # A triplet that passed is remembered this long after it was last seen.
    expiry: Seconds = 35 * 86400
    # Client addresses are grouped into networks of these prefix lengths.
    ipv4_prefix: Annotated[int, Field(ge=8, le=32)] = 24
    ipv6_prefix: Annotated[int, Field(ge=16, le=128)] = 64
    # A client network that passed greylisting this many times skips it; 0 turns this off.
    auto_whitelist_after: Annotated[int, Field(ge=0)] = 5
    # Large senders that retry from many addresses: one pattern per line (see the shipped file).
    # None uses the list shipped with postwarden.
    large_senders_file: Path | None = None
    # Text of the deferral (the client sees "450 4.7.1 <text>").
    defer_text: str = "Greylisted, please try again later"
    # Add an X-Greylist: header to mail that passed after a delay.
    add_header: bool = True


class DnsblZone(Section):
    zone: Domain
    weight: int = 1
    # Return codes that count: "127.0.0.2", ranges "127.0.0.2-127.0.0.11" or networks
    # "127.0.0.0/24". Empty: any 127/8.
    codes: list[DnsblCode] = Field(default_factory=list)


class DnsblConfig(Section):
    enabled: bool = False
    zones: list[DnsblZone] = Field(default_factory=list)
    # A client whose summed zone weights reach this is rejected.
    threshold: Annotated[int, Field(ge=1)] = 1
    # Total time for all zones together (seconds); a zone that has not answered counts as clean.
    budget: Annotated[float, Field(gt=0, le=30)] = 2.0
    reject_text: str = "Client host blocked using DNSBL"


class SpfConfig(Section):
    enabled: bool = False
    # `fail` results: "reject" refuses the recipient, "mark" only adds Received-SPF.
    fail_action: Literal["reject", "mark"] = "reject"
    # Time bound for one SPF evaluation (seconds), after which the result is temperror. Each
    # DNS query gets at most the time left, so a lookup that times out at the end still has
    # its own result. 20: RFC 7208 section 4.6.4 "SHOULD allow at least 20 seconds".
    timeout: Annotated[float, Field(gt=0, le=60)] = 20.0
    add_header: bool = True


class DkimKey(Section):
    domain: str
    selector: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    key: Path

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, value: str) -> str:
        return check_domain(value)

    @field_validator("selector")
    @classmethod
    def _valid_selector(cls, value: str) -> str:
        # s= and a DNS name (and keygen's file name): labels of letters, digits and '-'.
        # The case is kept: it is part of the file name keygen wrote.
        try:
            if not value.isascii() or len(value) > MAX_NAME:
                raise DomainNameError("letters, digits, '-' and dots")
            check_labels(value.lower())
        except DomainNameError as exc:
            raise ValueError(f"{value!r} is not a selector: {exc}") from None
        return value


class DkimConfig(Section):
    sign: bool = True
    verify: bool = True
    # Also sign for subdomains of a configured key's domain.
    sign_subdomains: bool = False
    keys: list[DkimKey] = Field(default_factory=list)
    # Where `postwarden dkim keygen` writes keys.
    key_directory: Path = Path("/etc/postwarden/dkim")


class NetworkConfig(Section):
    # Mail from these networks is outgoing: signed, not filtered.
    trusted: list[Network] = Field(
        default_factory=lambda: [parse_network("127.0.0.0/8"), parse_network("::1/128")]
    )

    @field_validator("trusted")
    @classmethod
    def _not_an_open_relay(cls, value: list[IPNetwork]) -> list[IPNetwork]:
        # The rule lives with the other hazards; here it stops every daemon, not just a check.
        hazard = open_relay_networks(value)
        if hazard is not None:
            raise ValueError(hazard.message)
        return value


class Config(Section):
    """The whole `postwarden.toml`."""

    store: StoreConfig = StoreConfig()
    policyd: PolicydConfig = PolicydConfig()
    milterd: MilterdConfig = MilterdConfig()
    frontd: FrontdConfig = FrontdConfig()
    dns: DnsConfig = DnsConfig()
    greylisting: GreylistingConfig = GreylistingConfig()
    dnsbl: DnsblConfig = DnsblConfig()
    spf: SpfConfig = SpfConfig()
    dkim: DkimConfig = DkimConfig()
    network: NetworkConfig = NetworkConfig()
    mail: MailConfig = MailConfig()
    gateway: GatewayConfig = GatewayConfig()

    @model_validator(mode="after")
    def _frontd_apart(self) -> Config:
        # frontd stands in front of these sockets; on the same one, one of them cannot bind.
        if self.frontd.enabled:
            taken = {str(a) for a in (*self.milterd.listen, *self.policyd.listen)}
            if self.policyd.aliases_listen is not None:
                taken.add(str(self.policyd.aliases_listen))
            for name in ("milter_listen", "sasl_listen"):
                value = getattr(self.frontd, name)
                if value is not None and str(value) in taken:
                    raise ValueError(f"frontd.{name} {value} is another daemon's socket")
        return self

    @model_validator(mode="after")
    def _gateway_domains_are_not_ours(self) -> Config:
        # Exclusive per domain: a backend's domain is relayed to it, never delivered here.
        if self.gateway.enabled:
            ours = set(self.mail.local_domains)
            relayed = {entry.domain for entry in self.mail.relay_domains}
            for domain in self.gateway.domains:
                if domain in ours:
                    raise ValueError(
                        f"gateway.domains: {domain} is also one of our mailbox domains "
                        "(mail.main_domain / mail.additional_domains); a domain is either "
                        "relayed to the backend or delivered here"
                    )
                if domain in relayed:
                    raise ValueError(
                        f"gateway.domains: {domain} is also in mail.relay_domains; name it once"
                    )
        return self

    @model_validator(mode="after")
    def _dnsbl_needs_zones(self) -> Config:
        if self.dnsbl.enabled and not self.dnsbl.zones:
            raise ValueError("dnsbl.enabled = true needs at least one [[dnsbl.zones]] entry")
        return self
