"""Mail-system settings rendered into Postfix and Dovecot (domains, ports, TLS, relays, …).

This is the `[mail]` table and its sub-tables (`[mail.tls]`, `[[mail.relays]]`,
`[mail.connection_control]`). Everything here is a product setting a user chooses; where
files live on disk (config dirs, sockets, queue) belongs to the render layout instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    field_validator,
    model_validator,
)

from postwarden.config.types import IPNetwork, parse_network
from postwarden.syntax.domain_names import DomainNameError, parse_domain_name
from postwarden.syntax.networks import NetworkSyntaxError, parse_ip_address

_MAILBOX_RE = re.compile(r"^[^@\s]+@[^@\s]+$")


class _Table(BaseModel):
    """Frozen, and unknown keys are errors (a typo names the key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def check_domain(value: str) -> str:
    """A lower-cased DNS domain name, or ValueError saying what is allowed."""
    try:
        return parse_domain_name(value)
    except DomainNameError as exc:
        raise ValueError(f"{value!r} is not a domain name: {exc}") from None


def check_host(value: str) -> str:
    """An IP address (brackets tolerated) in its normal spelling, or a host name."""
    try:
        return str(parse_ip_address(value.strip().strip("[]")))
    except NetworkSyntaxError:
        return check_domain(value)


def _check_mailbox(value: str) -> str:
    if not _MAILBOX_RE.match(value):
        raise ValueError(f"{value!r} is not a mail address (user@domain)")
    return value


def check_sender_grant(value: str) -> str:
    """A grant: one address (`ceo@example.com`) or a whole domain (`@example.org`), lower-cased."""
    text = value.strip().lower()
    if text.startswith("@"):
        return "@" + check_domain(text[1:])
    local, _, domain = _check_mailbox(text).rpartition("@")
    return f"{local}@{check_domain(domain)}"


Domain = Annotated[str, PlainValidator(lambda v: check_domain(_text(v)))]
Mailbox = Annotated[str, PlainValidator(lambda v: _check_mailbox(_text(v)))]
SenderGrant = Annotated[str, PlainValidator(lambda v: check_sender_grant(_text(v)))]
LoginName = Annotated[str, PlainValidator(lambda v: _check_mailbox(_text(v)).lower())]
Port = Annotated[int, Field(ge=1, le=65535)]


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


@dataclass(frozen=True)
class RelayDomain:
    """`domain|ip` or `domain|host` (optionally `:port`): mail for `domain` goes to that server."""

    domain: str
    host: str
    port: int = 25

    @property
    def nexthop(self) -> str:
        """Postfix's next-hop form: brackets turn off the MX lookup, as the user named a server."""
        host = f"ipv6:{self.host}" if ":" in self.host else self.host
        return f"[{host}]:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        suffix = "" if self.port == 25 else f":{self.port}"
        return f"{self.domain}|{host}{suffix}"


def parse_relay_domain(value: object) -> RelayDomain:
    """Parse the seed's `domain.name|192.168.1.1` / `domain.name|relay.domain` (spaces allowed)."""
    if isinstance(value, RelayDomain):
        return value
    text = _text(value)
    domain, sep, target = (part.strip() for part in text.partition("|"))
    if not sep or not domain or not target:
        raise ValueError("must look like 'example.com|192.168.1.1' or 'example.com|mx.lan'")
    port = 25
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?", target)
    if m:  # [IPv6] or [IPv4] with optional port
        host, port_text = m.group(1), m.group(2)
    elif target.count(":") == 1:
        host, port_text = target.split(":")
    else:
        host, port_text = target, None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port must be 1..65535")
        port = int(port_text)
    return RelayDomain(check_domain(domain), check_host(host), port)


RelayDomainEntry = Annotated[
    RelayDomain, PlainValidator(parse_relay_domain), PlainSerializer(str, return_type=str)
]


def parse_client_pattern(value: object) -> IPNetwork:
    """A connection-control entry: IP, CIDR, `addr:mask`, IPv6 prefix or `192.168.1.*`."""
    return parse_network(_text(value))


ClientPattern = Annotated[
    IPNetwork, PlainValidator(parse_client_pattern), PlainSerializer(str, return_type=str)
]


class TlsConfig(_Table):
    """Certificates for inbound TLS (SMTP, IMAP, POP3) and the CA used to verify peers."""

    # PEM certificate chain and private key; unset means the self-signed pair generated at
    # install (for mail.hostname) is used.
    cert: Path | None = None
    key: Path | None = None
    # CA bundle (PEM) for outbound TLS to the configured relays. When set, a relay whose TLS
    # is mandatory (starttls = "required", or protocol = "smtps") must present a certificate
    # signed by this CA that names the relay's `host` (Postfix level "verify"); otherwise the
    # mail stays deferred, with the verification failure as its reason. Unset, such relays
    # encrypt without checking the certificate (level "encrypt"). Relays with
    # starttls = "enabled" stay opportunistic either way.
    ca: Path | None = None
    # Outbound TLS to ordinary destinations (not configured relays): "may" = opportunistic.
    outbound_level: Literal["none", "may", "encrypt"] = "may"

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key must be given together (or neither)")
        return self

    @property
    def self_signed(self) -> bool:
        return self.cert is None


class RelayServer(_Table):
    """An outbound SMTP server that our outgoing mail is handed to (the provider's smarthost)."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
    # smtp: plain SMTP (optionally STARTTLS); smtps: TLS from the first byte (port 465 style).
    protocol: Literal["smtp", "smtps"] = "smtp"
    host: str
    port: Port | None = None
    username: str | None = None
    # File holding the password (one line); read at render time, never logged.
    password_file: Path | None = None
    starttls: Literal["disabled", "enabled", "required"] = "enabled"
    # Connect and per-command timeout, seconds.
    timeout: Annotated[int, Field(ge=1, le=3600)] = 30
    # Mail from these sender domains goes through this server; empty: every other sender.
    sender_domains: list[Domain] = Field(default_factory=list)

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        return check_host(value)

    @model_validator(mode="after")
    def _credentials_together(self) -> RelayServer:
        if (self.username is None) != (self.password_file is None):
            raise ValueError(
                f"relay {self.name!r}: username and password_file must be given together"
            )
        if self.protocol == "smtps" and self.starttls != "enabled":
            raise ValueError(
                f"relay {self.name!r}: starttls does not apply to protocol = 'smtps' "
                "(TLS is always on); leave it unset"
            )
        return self

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (465 if self.protocol == "smtps" else 25)

    @property
    def nexthop(self) -> str:
        host = f"ipv6:{self.host}" if ":" in self.host else self.host
        return f"[{host}]:{self.effective_port}"

    @property
    def tls_level(self) -> str:
        """Postfix smtp_tls_security_level for this relay, without a CA to verify against."""
        if self.protocol == "smtps":
            return "encrypt"
        return {"disabled": "none", "enabled": "may", "required": "encrypt"}[self.starttls]

    def tls_level_with_ca(self, ca: Path | None) -> str:
        """The level once mail.tls.ca is known: mandatory TLS becomes verified TLS.

        "verify", not "secure": "verify" checks the chain and that the certificate names the
        host we connect to (smtp_tls_verify_cert_match = hostname, i.e. the relay's `host`,
        an IP address included), which is what "this relay's certificate" means. "secure"
        matches the next-hop *domain* patterns (nexthop, dot-nexthop), meant for MX-based
        delivery to a domain, not for a relay named by a bracketed host or IP."""
        if ca is not None and self.tls_level == "encrypt":
            return "verify"
        return self.tls_level


def parse_client_patterns_file(text: str, source: str) -> list[IPNetwork]:
    """The seed's IP list file: one entry per line (`192.168.2.0:255.255.255.0`, `2001:db8::/32`,
    `10.1.*`); blank lines and `#` comments are skipped. ValueError names `source:line`."""
    networks = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            networks.append(parse_client_pattern(entry))
        except ValueError as exc:
            raise ValueError(f"{source}:{number}: {exc}") from None
    return networks


class ConnectionControl(_Table):
    """Which clients may connect at all (checked by Postfix before anything else)."""

    # accept-all-except: the listed clients are refused; deny-all-except: only they may connect
    # (trusted networks always may).
    mode: Literal["accept-all-except", "deny-all-except"] = "accept-all-except"
    addresses: list[ClientPattern] = Field(default_factory=list)
    # An IP list in the seed's import format, one entry per line, merged with `addresses`;
    # read when the config is rendered (like a relay's password_file).
    addresses_file: Path | None = None


class MailConfig(_Table):
    """Domains, identity, listeners, limits, TLS, relays and copies of the gateway."""

    # The server's name: MX target, TLS certificate name, and (by default) the HELO name.
    hostname: Domain = "localhost"
    # Name used in HELO/EHLO towards other servers; defaults to hostname.
    helo_name: Domain | None = None
    # Mailboxes live in these domains (delivered to Dovecot over LMTP).
    main_domain: Domain = "localhost"
    additional_domains: list[Domain] = Field(default_factory=list)
    # Mail for these domains is forwarded to an inside server: "domain|ip" or "domain|host".
    relay_domains: list[RelayDomainEntry] = Field(default_factory=list)

    # "loopback": only 127.0.0.1 (and ::1); "all": every interface.
    listen: Literal["loopback", "all"] = "all"
    ipv6: bool = True

    smtp_port: Port = 25
    # Submission with STARTTLS enforced (587) and implicit TLS (465); SASL required on both.
    submission: bool = True
    submission_port: Port = 587
    smtps: bool = True
    smtps_port: Port = 465
    imap: bool = True
    imap_port: Port = 143
    imaps: bool = True
    imaps_port: Port = 993
    pop3: bool = False
    pop3_port: Port = 110
    pop3s: bool = False
    pop3s_port: Port = 995

    # Concurrent SMTP connections from one client (0: unlimited; trusted networks are exempt)
    # and per SMTP port in total.
    max_connections_per_client: Annotated[int, Field(ge=0)] = 50
    max_connections: Annotated[int, Field(ge=1, le=10000)] = 100
    # An SMTP client that says nothing for this long is disconnected (seconds).
    idle_timeout: Annotated[int, Field(ge=1, le=3600)] = 300
    # Largest message accepted, in bytes (advertised in EHLO SIZE and enforced).
    message_size_limit: Annotated[int, Field(ge=1024)] = 25 * 1024 * 1024
    # Mailbox quota in megabytes; 0 = unlimited.
    mailbox_quota_mb: Annotated[int, Field(ge=0)] = 0
    # Messages in Trash are deleted after this many days; 0 = kept forever.
    trash_retention_days: Annotated[int, Field(ge=0, le=3650)] = 30

    # SMTP AUTH through Dovecot, on 587/465 only. tls_only_auth is kept so older files still
    # load; it changes nothing: 587 enforces STARTTLS before AUTH and 465 is TLS throughout.
    sasl: bool = True
    tls_only_auth: bool = True
    # Require STARTTLS before login on IMAP 143 / POP3 110.
    imap_pop3_require_tls: bool = True

    tls: TlsConfig = TlsConfig()
    relays: list[RelayServer] = Field(default_factory=list)

    # A copy of all incoming (to our domains) / outgoing (from our domains) mail goes here.
    copy_incoming_to: Mailbox | None = None
    copy_outgoing_to: Mailbox | None = None

    connection_control: ConnectionControl = ConnectionControl()

    # --- hardening (README "Security") ---
    # SMTP smuggling: only <CR><LF>.<CR><LF> ends DATA, for every client, trusted ones too
    # (smtpd_forbid_bare_newline = normalize: a bare-LF line is still read as a line), and a
    # client sending commands before the greeting or ahead of a reply is disconnected
    # (smtpd_forbid_unauth_pipelining, reject_unauth_pipelining). Off only for a broken
    # client that ends DATA with a bare LF and cannot be fixed; `config check` warns.
    smuggling_protection: bool = True
    # On 587/465 a logged-in user may send only as their own mailbox, the forwarding aliases
    # that deliver to it (when policyd serves aliases) and what is granted here:
    # login -> ["addr@example.com", "@whole-domain.example"] (a whole domain, not its
    # subdomains). Logins and addresses compare case-insensitively.
    sender_grants: dict[LoginName, list[SenderGrant]] = Field(default_factory=dict)
    # Port 25, not logged in, not a trusted network, envelope sender in one of our mailbox
    # domains (main_domain, additional_domains; not their subdomains): refused at RCPT with
    # 550 5.7.1 (our own users send through 587/465), so nobody outside can pose as them.
    # Off for senders that legitimately use our domains from elsewhere (an outside mailing
    # service, forwarding without SRS).
    reject_forged_local_senders: bool = True
    # postmaster@ and abuse@ of every mail domain are delivered here (RFC 5321 4.5.1,
    # RFC 2142), before any stored alias; unset: postmaster@<main_domain>, which must then
    # be a mailbox. Also Dovecot's postmaster_address (the sender of its rejections).
    postmaster_address: Mailbox | None = None
    # SMTP AUTH commands per client IP per minute on 587/465 (Postfix anvil: the next one
    # gets 450 4.7.1); trusted networks are exempt; 0 = unlimited.
    auth_rate_limit: Annotated[int, Field(ge=0, le=10000)] = 10
    # Install and enable a fail2ban jail for SMTP AUTH and IMAP/POP3 login failures.
    fail2ban: bool = False

    @property
    def local_domains(self) -> list[str]:
        return [self.main_domain, *[d for d in self.additional_domains if d != self.main_domain]]

    @property
    def helo(self) -> str:
        return self.helo_name or self.hostname

    @property
    def default_relay(self) -> RelayServer | None:
        return next((r for r in self.relays if not r.sender_domains), None)

    @model_validator(mode="after")
    def _consistent(self) -> MailConfig:
        local = set(self.local_domains)
        for entry in self.relay_domains:
            if entry.domain in local:
                raise ValueError(
                    f"relay_domains: {entry.domain!r} is also a local mailbox domain; "
                    "a domain is either stored here or relayed inside, not both"
                )
        seen_relay: set[str] = set()
        seen_sender: dict[str, str] = {}
        defaults = [r.name for r in self.relays if not r.sender_domains]
        for relay in self.relays:
            if relay.name in seen_relay:
                raise ValueError(f"relays: name {relay.name!r} is used twice")
            seen_relay.add(relay.name)
            for domain in relay.sender_domains:
                if domain in seen_sender:
                    raise ValueError(
                        f"relays: sender domain {domain!r} is in both "
                        f"{seen_sender[domain]!r} and {relay.name!r}"
                    )
                seen_sender[domain] = relay.name
        if len(defaults) > 1:
            raise ValueError(
                f"relays: only one relay may omit sender_domains (the default); got {defaults}"
            )
        ports = {
            "smtp_port": self.smtp_port,
            **({"submission_port": self.submission_port} if self.submission else {}),
            **({"smtps_port": self.smtps_port} if self.smtps else {}),
            **({"imap_port": self.imap_port} if self.imap else {}),
            **({"imaps_port": self.imaps_port} if self.imaps else {}),
            **({"pop3_port": self.pop3_port} if self.pop3 else {}),
            **({"pop3s_port": self.pop3s_port} if self.pop3s else {}),
        }
        by_port: dict[int, str] = {}
        for key, port in ports.items():
            if port in by_port:
                raise ValueError(f"{key} = {port} is already used by {by_port[port]}")
            by_port[port] = key
        if (self.submission or self.smtps) and not self.sasl:
            raise ValueError(
                "submission/smtps need sasl = true (clients log in there); "
                "set submission = false and smtps = false for a relay-only gateway"
            )
        return self
