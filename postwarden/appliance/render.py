"""Postfix and Dovecot configuration rendered from the one config.

The templates in `postfix-config/` and `dovecot-config/` are data; this module only computes
the values that fill them. They ship as package data of `postwarden.appliance` (its
`templates/postfix` and `templates/dovecot` link to those folders, and a wheel holds them as
files), so an installed wheel renders without a source checkout. Product settings come from
`Config`; where things live on disk (config dirs, queue, sockets, chroot, test port
overrides) comes from a `Layout`, so the appliance and the private test instance render from
the same templates.

Contract: docs/ARCHITECTURE.md, "Layers".
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from postwarden.appliance import gateway_render
from postwarden.config.mail import MailConfig, RelayServer, parse_client_patterns_file
from postwarden.config.model import Config
from postwarden.config.types import IPNetwork, ListenAddress

_TEMPLATES = resources.files("postwarden.appliance") / "templates"
POSTFIX_TEMPLATES = _TEMPLATES / "postfix"
DOVECOT_TEMPLATES = _TEMPLATES / "dovecot"

# Files holding secrets (relay passwords): written 0600, never printed.
SECRET_FILES = frozenset({"postfix/relay_passwords"})


class RenderError(Exception):
    """The config cannot be rendered (e.g. a relay's password file is unreadable)."""


class _Template(string.Template):
    # Postfix uses $name and Dovecot %x, so our placeholders are @{name}.
    delimiter = "@"


@dataclass(frozen=True)
class Layout:
    """Filesystem and instance facts that are not product settings."""

    postfix_dir: Path
    dovecot_dir: Path
    queue_directory: Path
    data_directory: Path
    mail_root: Path
    users_file: Path
    dovecot_base_dir: Path
    # Unix sockets as Dovecot creates them (absolute paths).
    lmtp_socket: Path
    auth_socket: Path
    # Self-signed pair used when [mail.tls] names no certificate.
    self_signed_cert: Path
    self_signed_key: Path
    chroot: bool = True
    mail_user: str = "vmail"
    mail_group: str = "vmail"
    postfix_user: str = "postfix"
    postfix_group: str = "postfix"
    # Override the policyd/milterd sockets (default: the first listen address in the config;
    # "" leaves the check out, for test instances running without that daemon).
    policyd_socket: str | None = None
    milterd_socket: str | None = None
    # Test-only facts.
    inet_interfaces: str | None = None
    dovecot_listen: str | None = None
    ports: Mapping[str, int] = field(default_factory=dict)
    xclient_hosts: tuple[str, ...] = ()
    maillog_file: Path | None = None
    dovecot_log_file: Path | None = None
    instance_name: str = "dovecot"
    # Override the forwarding-alias table (default: policyd.aliases_listen's socketmap).
    virtual_alias_maps: str = ""
    # Override the live mailbox table (default: policyd's `mailboxes` socketmap when both
    # policyd.aliases_listen and policyd.mailbox_lmtp are set; else the LMTP verify probe).
    virtual_mailbox_maps: str = ""

    @classmethod
    def debian(cls, *, systemd: bool | None = None) -> Layout:
        """Debian 12's Postfix and Dovecot, as the appliance installs them.

        Under systemd both log to syslog, which journald keeps. Without it (containers, CI)
        nothing listens on /dev/log, so Postfix writes through its own postlogd and Dovecot
        to a file, both under /var/log (logrotate rules ship with the appliance)."""
        if systemd is None:
            systemd = Path("/run/systemd/system").is_dir()
        queue = Path("/var/spool/postfix")
        return cls(
            postfix_dir=Path("/etc/postfix"),
            dovecot_dir=Path("/etc/dovecot"),
            queue_directory=queue,
            data_directory=Path("/var/lib/postfix"),
            mail_root=Path("/var/mail/vhosts"),
            users_file=Path("/etc/postwarden/users"),
            dovecot_base_dir=Path("/run/dovecot"),
            lmtp_socket=queue / "private" / "dovecot-lmtp",
            auth_socket=queue / "private" / "auth",
            self_signed_cert=Path("/etc/postwarden/tls/self-signed.crt"),
            self_signed_key=Path("/etc/postwarden/tls/self-signed.key"),
            maillog_file=None if systemd else Path("/var/log/mail.log"),
            dovecot_log_file=None if systemd else Path("/var/log/dovecot.log"),
        )

    def port(self, cfg: MailConfig, key: str) -> int:
        """A listener port: the test override when there is one, else the setting."""
        value = self.ports.get(key)
        return value if value is not None else int(getattr(cfg, key))

    def postfix_path(self, path: Path) -> str:
        """How a chrooted Postfix daemon names a path inside its queue directory."""
        if self.chroot and path.is_relative_to(self.queue_directory):
            return str(path.relative_to(self.queue_directory))
        return str(path)

    def postfix_socket(self, address: str | ListenAddress) -> str:
        """A daemon address in Postfix's `unix:path` / `inet:host:port` form."""
        text = str(address)
        if text.startswith("unix:"):
            return "unix:" + self.postfix_path(Path(text[len("unix:") :]))
        return text


def _cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    names += [
        str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    return names


def _name_matches(pattern: str, hostname: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = hostname.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == hostname


def _read_pem(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RenderError(f"{key}: cannot read {exc.filename}: {exc.strerror}") from None


def _load_pair(cert_key: str, cert_path: Path, key_key: str, key_path: Path) -> x509.Certificate:
    """A PEM certificate and its unencrypted PEM key, which must belong together."""
    pem, key_pem = _read_pem(cert_key, cert_path), _read_pem(key_key, key_path)
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise RenderError(f"{cert_key}: {cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise RenderError(f"{key_key}: {key_path} is not an unencrypted PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != cert.public_key().public_bytes(der, public):
        raise RenderError(f"{key_key}: {key_path} is not the key of {cert_path}")
    return cert


def check_tls_files(cfg: Config) -> None:
    """The TLS files the config names must load.

    An operator-supplied certificate must match its key and name mail.hostname; in gateway
    mode the backend CA must hold PEM certificates, and a client certificate its key."""
    tls = cfg.mail.tls
    if tls.cert is not None and tls.key is not None:
        cert = _load_pair("mail.tls.cert", tls.cert, "mail.tls.key", tls.key)
        names = _cert_names(cert)
        hostname = cfg.mail.hostname
        if not any(_name_matches(n, hostname) for n in names):
            raise RenderError(
                f"mail.tls.cert: {tls.cert} is for {', '.join(names) or 'no name'}, "
                f"not for mail.hostname {hostname!r}"
            )
    gw = cfg.gateway
    if not gw.enabled:
        return
    if gw.ca is not None:
        try:
            x509.load_pem_x509_certificates(_read_pem("gateway.ca", gw.ca))
        except ValueError:
            raise RenderError(f"gateway.ca: {gw.ca} holds no PEM certificate") from None
    if gw.client_cert is not None and gw.client_key is not None:
        _load_pair("gateway.client_cert", gw.client_cert, "gateway.client_key", gw.client_key)


def _template(directory: Traversable, name: str) -> _Template:
    return _Template(directory.joinpath(name).read_text(encoding="utf-8"))


def _unreachable_policy_action(action: str) -> str:
    """The access(5) action Postfix takes when policyd cannot be asked, with the reason."""
    if action == "DEFER_IF_PERMIT":
        return "DEFER_IF_PERMIT policy service unavailable; try again later"
    return action


def _postfix_seconds(seconds: float) -> str:
    """A Postfix time value: whole seconds, rounded up (Postfix takes no fractions), >= 1s."""
    return f"{max(1, math.ceil(seconds))}s"


def _table(entries: list[tuple[str, str]]) -> str:
    return "".join(f"{key} {value}\n" for key, value in entries)


def _read_password(relay: RelayServer) -> str:
    assert relay.password_file is not None
    try:
        lines = relay.password_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise RenderError(
            f"relay {relay.name!r}: cannot read password_file {str(relay.password_file)!r}: "
            f"{exc.strerror}"
        ) from None
    if not lines or not lines[0]:
        raise RenderError(f"relay {relay.name!r}: password_file {relay.password_file} is empty")
    if any(c.isspace() for c in lines[0]):
        raise RenderError(f"relay {relay.name!r}: the password may not contain whitespace")
    return lines[0]


def _relay_service(relay: RelayServer, chroot: str, ca: Path | None) -> str:
    level = relay.tls_level_with_ca(ca)
    opts = [
        f"syslog_name=postfix/relay-{relay.name}",
        f"smtp_tls_security_level={level}",
        f"smtp_tls_wrappermode={'yes' if relay.protocol == 'smtps' else 'no'}",
        f"smtp_connect_timeout={relay.timeout}s",
        f"smtp_helo_timeout={relay.timeout}s",
        f"smtp_mail_timeout={relay.timeout}s",
        f"smtp_rcpt_timeout={relay.timeout}s",
        f"smtp_starttls_timeout={relay.timeout}s",
    ]
    if relay.username is not None:
        opts += [
            "smtp_sasl_auth_enable=yes",
            "smtp_sasl_password_maps=texthash:$config_directory/relay_passwords",
            "smtp_sasl_security_options=noanonymous",
            "smtp_sasl_tls_security_options=noanonymous",
        ]
    if ca is not None:
        opts.append(f"smtp_tls_CAfile={ca}")
    lines = [f"relay_{relay.name} unix  -       -       {chroot}       -       -       smtp"]
    lines += [f"  -o {opt}" for opt in opts]
    return "\n".join(lines)


def _smtp_services(cfg: MailConfig, layout: Layout, chroot: str) -> str:
    def service(port: int, name: str | None, opts: list[str]) -> str:
        # maxproc caps concurrent SMTP sessions on this port (one smtpd process each).
        limit = cfg.max_connections
        head = f"{port:<9} inet  n       -       {chroot}       -       {limit:<7} smtpd"
        # Port 25 keeps Postfix's own name (postfix/smtpd[pid]): stock fail2ban filters and
        # log tools expect it; the submission ports say which port a line comes from.
        naming = [f"  -o syslog_name=postfix/{name}"] if name else []
        return "\n".join([head, *naming, *(f"  -o {o}" for o in opts)])

    # Ports 587/465 are for our own users: log in first, then send as an address you own.
    # AUTH is offered only here (main.cf turns it off for port 25, where no user logs in).
    submit = [
        "smtpd_sasl_auth_enable=yes",
        "smtpd_tls_auth_only=yes",
        f"smtpd_client_auth_rate_limit={cfg.auth_rate_limit}",
        "smtpd_client_restrictions=permit_sasl_authenticated,reject",
        "smtpd_sender_restrictions=$submission_sender_restrictions",
        "smtpd_relay_restrictions=permit_sasl_authenticated,reject",
        "smtpd_recipient_restrictions=$submission_recipient_restrictions",
        # Port 25's DATA check asks policyd; a logged-in user's mail never waits for it.
        "smtpd_data_restrictions="
        + ("reject_unauth_pipelining" if cfg.smuggling_protection else ""),
        "milter_macro_daemon_name=ORIGINATING",
        # No session transcripts to the postmaster from here: they hold the AUTH line, a
        # password in base64 (notify_classes' default sends them on resource and software
        # errors).
        "notify_classes=",
    ]
    # Connection control answers at connect (a 554 greeting), not only at RCPT. No DSN on
    # port 25: a success notice there would go to whatever sender an outsider forged.
    smtp = ["smtpd_delay_reject=no", "smtpd_discard_ehlo_keywords=silent-discard,dsn"]
    out = [service(layout.port(cfg, "smtp_port"), None, smtp)]
    if cfg.submission:
        out.append(
            service(
                layout.port(cfg, "submission_port"),
                "submission",
                ["smtpd_tls_security_level=encrypt", *submit],
            )
        )
    if cfg.smtps:
        out.append(
            service(
                layout.port(cfg, "smtps_port"),
                "smtps",
                ["smtpd_tls_wrappermode=yes", "smtpd_tls_security_level=encrypt", *submit],
            )
        )
    return "\n".join(out)


def _connection_control_addresses(cfg: MailConfig) -> list[IPNetwork]:
    control = cfg.connection_control
    if control.addresses_file is None:
        return list(control.addresses)
    path = control.addresses_file
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise RenderError(
            f"mail.connection_control.addresses_file: cannot read {str(path)!r}: {reason}"
        ) from None
    try:
        from_file = parse_client_patterns_file(text, str(path))
    except ValueError as exc:
        raise RenderError(f"mail.connection_control.addresses_file: {exc}") from None
    # Listed twice (in the table and the file) is the same entry once.
    return list(dict.fromkeys([*control.addresses, *from_file]))


def _client_access(cfg: MailConfig) -> str:
    control = cfg.connection_control
    action = (
        "REJECT 5.7.1 Connection refused by policy"
        if (control.mode == "accept-all-except")
        else "OK"
    )
    return "".join(f"{net} {action}\n" for net in _connection_control_addresses(cfg))


def _domain_pattern(domain: str) -> str:
    """A regexp table key matching addresses in exactly this domain (not its subdomains)."""
    # A domain name holds letters, digits, "-" and dots; only the dot is special in a regexp.
    return "/@" + domain.replace(".", "\\.") + "$/"


def _sender_grant_tables(cfg: MailConfig) -> tuple[str, str]:
    """mail.sender_grants turned around: address -> logins (texthash), domain -> logins (regexp).

    Postfix asks smtpd_sender_login_maps "who owns this sender?", so the grants are keyed by
    the granted address. Domain grants are regexps on the whole address: inside the unionmap a
    `@domain` key is never asked (the identity table always answers the full address)."""
    by_address: dict[str, list[str]] = {}
    by_domain: dict[str, list[str]] = {}
    for login, grants in cfg.sender_grants.items():
        for grant in grants:
            table = by_domain if grant.startswith("@") else by_address
            key = grant[1:] if grant.startswith("@") else grant
            table.setdefault(key, [])
            if login not in table[key]:
                table[key].append(login)
    addresses = _table([(a, ",".join(logins)) for a, logins in by_address.items()])
    domains = _table([(_domain_pattern(d), ",".join(ls)) for d, ls in by_domain.items()])
    return addresses, domains


def render_postfix(cfg: Config, layout: Layout) -> dict[str, str]:
    """main.cf, master.cf and the lookup tables they name, keyed by file name."""
    mail = cfg.mail
    # Maps are named through $config_directory so `postfix -c STAGING check` reads the staged ones.
    conf = "$config_directory"
    chroot = "y" if layout.chroot else "n"
    files: dict[str, str] = {}

    # Relay domains ("domain|host"): accepted from anyone, forwarded to the named server.
    # Gateway mode: the backend's domains, and what their users send, go to the backend.
    gateway = cfg.gateway if cfg.gateway.enabled else None
    to_backend, from_backend = gateway_render.postfix_routes(gateway) if gateway else ([], [])
    files["transport"] = _table(
        [(d.domain, f"relay:{d.nexthop}") for d in mail.relay_domains] + to_backend
    )

    outbound: list[str] = []
    sender_relays: list[tuple[str, str]] = list(from_backend)
    passwords: list[tuple[str, str]] = []
    for relay in mail.relays:
        target = f"relay_{relay.name}:{relay.nexthop}"
        sender_relays += [(f"@{domain}", target) for domain in relay.sender_domains]
        if relay.username is not None:
            passwords.append((relay.nexthop, f"{relay.username}:{_read_password(relay)}"))
    default = mail.default_relay
    if default is not None:
        outbound.append(f"default_transport = relay_{default.name}:{default.nexthop}")
    if sender_relays:
        outbound.append(f"sender_dependent_default_transport_maps = texthash:{conf}/sender_relays")
    files["sender_relays"] = _table(sender_relays)
    files["relay_passwords"] = _table(passwords)

    local = mail.local_domains
    files["recipient_bcc"] = _table(
        [(f"@{d}", mail.copy_incoming_to) for d in local] if mail.copy_incoming_to else []
    )
    files["sender_bcc"] = _table(
        [(f"@{d}", mail.copy_outgoing_to) for d in local] if mail.copy_outgoing_to else []
    )
    files["client_access"] = _client_access(mail)
    files["mailbox_domains"] = _table([(d, "verify_mailbox") for d in local])

    if mail.connection_control.mode == "deny-all-except":
        client_restrictions = f"permit_mynetworks, check_client_access cidr:{conf}/client_access, "
        client_restrictions += "reject"
    else:
        client_restrictions = f"check_client_access cidr:{conf}/client_access"

    instance: list[str] = []
    if layout.maillog_file is not None:
        instance += [
            f"maillog_file = {layout.maillog_file}",
            f"maillog_file_prefixes = {layout.maillog_file.parent}",
        ]
    cert = mail.tls.cert or layout.self_signed_cert
    key = mail.tls.key or layout.self_signed_key
    policyd = layout.policyd_socket
    if policyd is None:
        policyd = layout.postfix_socket(cfg.policyd.listen[0])
    # With frontd on, Postfix talks to its front ends, which stand in for milterd and
    # Dovecot's auth service while those are away (frontd/server.py).
    milterd = layout.milterd_socket
    if milterd is None:
        front = cfg.frontd.milter_listen if cfg.frontd.enabled else cfg.milterd.listen[0]
        milterd = layout.postfix_socket(front)
    # Forwarding aliases are looked up live in policyd's socketmap (no postmap, no reload).
    alias_map = layout.virtual_alias_maps
    if not alias_map and cfg.policyd.aliases_listen is not None:
        alias_map = f"socketmap:{layout.postfix_socket(cfg.policyd.aliases_listen)}:aliases"
    # postmaster@ and abuse@ of every mail domain exist (RFC 5321 4.5.1, RFC 2142). First,
    # so that no alias in the store can take them over (Postfix stops at the first match).
    postmaster = mail.postmaster_address or f"postmaster@{mail.main_domain}"
    files["postmaster_aliases"] = _table(
        [(f"{user}@{d}", postmaster) for d in local for user in ("postmaster", "abuse")]
    )
    virtual_alias_maps = ", ".join(
        [f"texthash:{conf}/postmaster_aliases", *([alias_map] if alias_map else [])]
    )

    # Which mailboxes exist: asked live of Dovecot through policyd's `mailboxes` socketmap
    # when it serves one, so a deleted user is refused at the very next RCPT. Without it the
    # LMTP verify probe stays, with a short in-memory cache (main.cf says how short).
    mailbox_map = layout.virtual_mailbox_maps
    if not mailbox_map and cfg.policyd.aliases_listen and cfg.policyd.mailbox_lmtp:
        mailbox_map = f"socketmap:{layout.postfix_socket(cfg.policyd.aliases_listen)}:mailboxes"
    # Address literals (user@[192.0.2.1]) name a host, not one of our domains: refused before
    # anything else, so nothing reaches the local delivery agent or relays unchecked.
    files["address_literals"] = (
        "/@\\[.*\\]$/ 550 5.1.2 Address literals (user@[address]) are not accepted here\n"
    )
    mailbox_check = (
        "reject_unlisted_recipient"
        if mailbox_map
        else f"check_recipient_access texthash:{conf}/mailbox_domains"
    )
    local_recipient_check = (
        f"check_recipient_access regexp:{conf}/address_literals, {mailbox_check}"
    )

    # Port 25 from outside, not logged in, sender in our own domains: a forgery (our users
    # send logged in on 587/465 or from a trusted network). Checked at RCPT after the relay
    # check, so a relay attempt still gets the relay refusal.
    files["local_sender_domains"] = _table(
        [
            (
                _domain_pattern(d),
                f"550 5.7.1 Sender address in our own domain {d}: log in to send "
                "(submission) or send from a trusted network",
            )
            for d in [*local, *(gateway.domains if gateway else [])]
        ]
    )
    forged_sender_check = (
        f",\n    check_sender_access regexp:{conf}/local_sender_domains"
        if mail.reject_forged_local_senders
        else ""
    )

    # Who may use a sender address on 587/465: the address itself (the login of that
    # mailbox), the logins mail.sender_grants names, and the targets of a forwarding alias.
    # One unionmap: Postfix stops at the first lookup key that finds anything, and the
    # identity table always answers the full address, so every source answers that key.
    # Postfix splits an owner list at blanks and commas: an address holding one (a quoted
    # local part, `"x alice@example.com y"@bigbank.example`) would name alice as an owner,
    # so such an address owns nothing by itself.
    files["sender_identity"] = "/^([^[:space:],]+)$/ ${1}\n"
    files["sender_grants"], files["sender_domain_grants"] = _sender_grant_tables(mail)
    owners = [
        f"regexp:{conf}/sender_identity",
        f"texthash:{conf}/sender_grants",
        f"regexp:{conf}/sender_domain_grants",
        *([alias_map] if alias_map else []),
    ]
    sender_login_maps = "unionmap:{" + ", ".join(owners) + "}"
    smuggling = mail.smuggling_protection

    # An empty policyd socket (test instances without policyd) leaves the policy check out.
    # Postfix waits as long as policyd may take for one request; when it cannot reach
    # policyd at all (down, frozen, no socket) it answers policyd.unreachable_action, by
    # default DEFER_IF_PERMIT: the mail waits (450) unless a later check refuses it, so an
    # outage never lets a forbidden sender in. Postfix logs each such answer as a reject.
    policy_timeout = _postfix_seconds(cfg.policyd.request_timeout)
    policy_default = _unreachable_policy_action(cfg.policyd.unreachable_action)
    policy_check = (
        f",\n    check_policy_service {{ {policyd}, timeout={policy_timeout}, "
        f"{{ default_action = {policy_default} }} }}"
        if policyd
        else ""
    )

    values = {
        "queue_directory": str(layout.queue_directory),
        "data_directory": str(layout.data_directory),
        "instance_settings": "\n".join(instance),
        "hostname": mail.hostname,
        "main_domain": mail.main_domain,
        "helo_name": mail.helo,
        "inet_interfaces": layout.inet_interfaces
        or ("loopback-only" if mail.listen == "loopback" else "all"),
        "inet_protocols": "all" if mail.ipv6 else "ipv4",
        "max_connections_per_client": str(mail.max_connections_per_client),
        "max_connections": str(mail.max_connections),
        "idle_timeout": str(mail.idle_timeout),
        "message_size_limit": str(mail.message_size_limit),
        "mynetworks": " ".join(
            f"[{n.network_address}]/{n.prefixlen}" if n.version == 6 else str(n)
            for n in cfg.network.trusted
        ),
        "virtual_mailbox_domains": " ".join(local),
        "lmtp_socket": layout.postfix_path(layout.lmtp_socket),
        "virtual_alias_maps": virtual_alias_maps,
        "virtual_mailbox_maps": mailbox_map,
        "local_recipient_check": local_recipient_check,
        "forged_sender_check": forged_sender_check,
        "sender_login_maps": sender_login_maps,
        "forbid_bare_newline": "normalize" if smuggling else "no",
        "forbid_unauth_pipelining": "yes" if smuggling else "no",
        # policyd is asked at DATA too (it answers DUNNO there): that request carries the
        # queue id, which joins its RCPT-time lines (same instance) to Postfix's. Only for
        # the clients it judged at RCPT: trusted and logged-in ones never wait for it.
        "data_restrictions": ", ".join(
            (["reject_unauth_pipelining"] if smuggling else [])
            + (
                ["permit_mynetworks", "permit_sasl_authenticated", policy_check.lstrip(",\n ")]
                if policy_check
                else []
            )
        ),
        "relay_domains": " ".join(
            [*(d.domain for d in mail.relay_domains), *(gateway.domains if gateway else [])]
        ),
        "transport_maps": f"texthash:{conf}/transport",
        "outbound_relay": "\n".join(outbound),
        "recipient_bcc_maps": f"texthash:{conf}/recipient_bcc",
        "sender_bcc_maps": f"texthash:{conf}/sender_bcc",
        "client_restrictions": client_restrictions,
        "policy_check": policy_check,
        "policy_default_action": policy_default,
        # Postfix keeps an idle connection to policyd no longer than policyd keeps it open.
        "policy_max_idle": _postfix_seconds(cfg.policyd.idle_timeout),
        "xclient_hosts": " ".join(layout.xclient_hosts),
        "auth_socket": layout.postfix_path(_sasl_sockets(cfg, layout)[0]),
        "tls_only_auth": "yes" if mail.tls_only_auth else "no",
        "milterd_socket": milterd,
        "tls_cert": str(cert),
        "tls_key": str(key),
        "outbound_tls_level": mail.tls.outbound_level,
        "tls_ca": f"smtp_tls_CAfile = {mail.tls.ca}" if mail.tls.ca else "",
    }
    files["main.cf"] = _template(POSTFIX_TEMPLATES, "main.cf.tmpl").substitute(values)
    files["master.cf"] = _template(POSTFIX_TEMPLATES, "master.cf.tmpl").substitute(
        {
            "chroot": chroot,
            "smtp_services": _smtp_services(mail, layout, chroot),
            "relay_services": "\n".join(
                [_relay_service(r, chroot, mail.tls.ca) for r in mail.relays]
                + ([gateway_render.postfix_backend_service(gateway, chroot)] if gateway else [])
            ),
        }
    )
    return files


def render_dovecot(cfg: Config, layout: Layout) -> dict[str, str]:
    """dovecot.conf, keyed by file name."""
    mail = cfg.mail
    gateway = cfg.gateway if cfg.gateway.enabled else None
    protocols = ["lmtp"]
    if mail.imap or mail.imaps:
        protocols.insert(0, "imap")
    if mail.pop3 or mail.pop3s:
        protocols.insert(-1, "pop3")

    def port(enabled: bool, key: str) -> str:
        # Port 0 keeps the listener block but opens nothing.
        return str(layout.port(mail, key)) if enabled else "0"

    if layout.dovecot_listen is not None:
        listen = layout.dovecot_listen
    elif mail.listen == "loopback":
        listen = "127.0.0.1, ::1" if mail.ipv6 else "127.0.0.1"
    else:
        listen = "*, ::" if mail.ipv6 else "*"
    # policyd asks whether a mailbox exists over its own LMTP socket (mailbox_lmtp); it runs
    # as the postwarden user, which is in the postfix group.
    probe = cfg.policyd.mailbox_lmtp
    probe_listener = ""
    if probe is not None and str(probe).startswith("unix:"):
        path = Path(str(probe)[len("unix:") :])
        # Dovecot names sockets in its base_dir relatively (an absolute one there is warned of).
        if path.is_relative_to(layout.dovecot_base_dir):
            path = path.relative_to(layout.dovecot_base_dir)
        probe_listener = "\n".join(
            [
                f"  unix_listener {path} {{",
                "    mode = 0660",
                f"    user = {layout.postfix_user}",
                f"    group = {layout.postfix_group}",
                "  }",
            ]
        )
    log = []
    if layout.dovecot_log_file is not None:
        log.append(f"log_path = {layout.dovecot_log_file}")
    values = {
        "base_dir": str(layout.dovecot_base_dir),
        "instance_name": layout.instance_name,
        "protocols": " ".join(protocols),
        "listen": listen,
        "log_settings": "\n".join(log),
        "ssl": "required" if mail.imap_pop3_require_tls else "yes",
        "tls_cert": str(mail.tls.cert or layout.self_signed_cert),
        "tls_key": str(mail.tls.key or layout.self_signed_key),
        "disable_plaintext_auth": "yes" if mail.imap_pop3_require_tls else "no",
        "mail_user": layout.mail_user,
        "mail_group": layout.mail_group,
        "mail_root": str(layout.mail_root),
        "trash_autoexpunge": (
            f"    autoexpunge = {mail.trash_retention_days}d" if mail.trash_retention_days else ""
        ),
        "users_file": str(layout.users_file),
        "quota_rule": (
            f"  quota_rule = *:storage={mail.mailbox_quota_mb}M" if mail.mailbox_quota_mb else ""
        ),
        "postmaster": mail.postmaster_address or f"postmaster@{mail.main_domain}",
        "probe_listener": probe_listener,
        "imap_port": port(mail.imap, "imap_port"),
        "imaps_port": port(mail.imaps, "imaps_port"),
        "pop3_port": port(mail.pop3, "pop3_port"),
        "pop3s_port": port(mail.pop3s, "pop3s_port"),
        "lmtp_socket": str(layout.lmtp_socket),
        "auth_socket": str(_sasl_sockets(cfg, layout)[1]),
        "postfix_user": layout.postfix_user,
        "postfix_group": layout.postfix_group,
        "gateway_settings": gateway_render.dovecot_settings(gateway) if gateway else "",
        "gateway_passdbs": gateway_render.dovecot_passdbs(gateway) if gateway else "",
        "local_passdb_filter": gateway_render.local_passdb_filter(gateway) if gateway else "",
    }
    text = _template(DOVECOT_TEMPLATES, "dovecot.conf.tmpl").substitute(values)
    return {"dovecot.conf": text}


def _sasl_sockets(cfg: Config, layout: Layout) -> tuple[Path, Path]:
    """Where Postfix's smtpd_sasl_path points, and where Dovecot's auth service listens:
    the same socket, or frontd's front end in front of Dovecot's (frontd.sasl_*)."""
    front = cfg.frontd
    if front.enabled and front.sasl_listen is not None and front.sasl_upstream is not None:
        return Path(front.sasl_listen.path), Path(front.sasl_upstream.path)
    return layout.auth_socket, layout.auth_socket


def render_all(cfg: Config, layout: Layout) -> dict[str, str]:
    """Every rendered file keyed `postfix/<name>` or `dovecot/<name>`."""
    out = {f"postfix/{k}": v for k, v in render_postfix(cfg, layout).items()}
    out.update({f"dovecot/{k}": v for k, v in render_dovecot(cfg, layout).items()})
    return out


def write_rendered(files: Mapping[str, str], root: Path) -> list[Path]:
    """Write `render_all` output under root (root/postfix/…, root/dovecot/…); secrets 0600."""
    written = []
    for name, text in sorted(files.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if name in SECRET_FILES else 0o644
        path.touch(mode=mode, exist_ok=True)
        path.chmod(mode)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
