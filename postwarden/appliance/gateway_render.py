"""The Postfix and Dovecot pieces of gateway mode, rendered from `[gateway]`.

render.py places them in main.cf, master.cf and dovecot.conf; this module only computes
them. Each value below follows docs/gateway-mode.md ("How each path works"), which says
why; the Dovecot 2.3.19 and Postfix 3.7 facts behind it are the ones that document names.
"""

from __future__ import annotations

from postwarden.config.gateway import BackendService, GatewayConfig, ServiceName

# The master.cf transport that carries every message bound for the backend.
BACKEND_TRANSPORT = "gateway_backend"


def backend_nexthop(gw: GatewayConfig) -> str:
    """The backend's SMTP in Postfix's next-hop form: brackets, so no MX lookup."""
    assert gw.smtp is not None
    host = f"ipv6:{gw.smtp.host}" if ":" in gw.smtp.host else gw.smtp.host
    return f"[{host}]:{gw.port('smtp')}"


def postfix_routes(gw: GatewayConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """transport(5) entries for the backend's domains, and sender-dependent ones.

    Mail TO a backend domain (inbound, or between the backend's users) goes to the backend;
    mail FROM one (what its users submit on 587/465, to anyone) goes there too, and the
    backend sends it on: the gateway filters and signs, the backend stays the outbound hop."""
    target = f"{BACKEND_TRANSPORT}:{backend_nexthop(gw)}"
    return [(d, target) for d in gw.domains], [(f"@{d}", target) for d in gw.domains]


def postfix_backend_service(gw: GatewayConfig, chroot: str) -> str:
    """The master.cf smtp client that talks to the backend with the configured security.

    Enforced STARTTLS and TLS are level `secure`: the certificate must chain to gateway.ca
    and carry the certificate name, and a backend that does not offer or complete TLS gets
    nothing (the mail stays deferred). `none` sends in the clear (tests only)."""
    assert gw.smtp is not None
    security = gw.smtp.security
    opts = [
        "syslog_name=postfix/gateway-backend",
        f"smtp_tls_security_level={'none' if security == 'none' else 'secure'}",
        f"smtp_tls_wrappermode={'yes' if security == 'tls' else 'no'}",
    ]
    if security != "none":
        opts += [
            f"smtp_tls_secure_cert_match={gw.certificate_name_for('smtp')}",
            f"smtp_tls_CAfile={gw.ca}",
        ]
        if gw.client_cert is not None:
            opts += [f"smtp_tls_cert_file={gw.client_cert}", f"smtp_tls_key_file={gw.client_key}"]
    lines = [f"{BACKEND_TRANSPORT} unix  -       -       {chroot}       -       -       smtp"]
    lines += [f"  -o {opt}" for opt in opts]
    return "\n".join(lines)


def _filter(gw: GatewayConfig) -> str:
    return " ".join(f"*@{d}" for d in gw.domains)


def _proxy_fields(gw: GatewayConfig, name: ServiceName, service: BackendService) -> str:
    """The static passdb's proxy fields: where the login process passes the login on.

    The proxy checks the backend's certificate against `host`, so host is the certificate
    name and hostip pins the address when one was configured. `ssl=no` is never written:
    Dovecot reads any ssl= as TLS on, so unencrypted leaves the field out."""
    fields = ["proxy=y"]
    if service.host_is_address:
        fields += [f"host={gw.certificate_name_for(name)}", f"hostip={service.host}"]
    else:
        fields.append(f"host={service.host}")
    fields.append(f"port={gw.port(name)}")
    fields += {"starttls": ["starttls=yes"], "tls": ["ssl=yes"], "none": []}[service.security]
    return " ".join(fields)


def _imapc_args(gw: GatewayConfig) -> str:
    """passdb imap's args: SMTP logins are one LOGIN at the backend's IMAP.

    imapc checks the certificate against `host` as written (it has no hostip) and will
    not start without the CA in its own args."""
    assert gw.imap is not None
    args = [f"host={gw.imap.host}", f"port={gw.port('imap')}"]
    if gw.imap.security != "none":
        args += [f"ssl={'starttls' if gw.imap.security == 'starttls' else 'imaps'}"]
        args.append(f"ssl_ca_file={gw.ca}")
    return " ".join(args)


def dovecot_settings(gw: GatewayConfig) -> str:
    """Global settings gateway mode needs: the backend CA for the chrooted login processes
    (ssl_ca; they ignore ssl_client_ca_*), without the CRL check that ssl_ca turns on for
    their client side, and no credential cache."""
    lines = ["# --- gateway mode: logins are the backend's (docs/gateway-mode.md) ---"]
    if gw.ca is not None:
        lines += [f"ssl_ca = <{gw.ca}", "ssl_require_crl = no"]
    lines += [
        "auth_cache_size = 0",
        "auth_verbose_passwords = no",
        "auth_debug_passwords = no",
        "login_trusted_networks =",
    ]
    return "\n".join(lines)


def dovecot_passdbs(gw: GatewayConfig) -> str:
    """The backend's passdbs, each limited to the backend's domains (username_filter).

    IMAP and POP3: a static passdb inside `protocol imap {}` / `protocol pop3 {}` (tried
    before the global ones) that answers "proxy, no password check": the login process
    sends the client's own login to the backend, which decides. Outside those blocks it
    would accept any password for SMTP, so it never is. SMTP (service=smtp, Postfix's SASL):
    a global passdb imap, whose every failure ends the lookup (a wrong password is an
    internal failure in 2.3, and `continue` would fall through to the next passdb). Without
    [gateway.pop3] POP3 logins are denied; without [gateway.imap] IMAP and SMTP logins."""
    users = _filter(gw)
    deny = ["driver = static", f"username_filter = {users}", "args = nopassword=y", "deny = yes"]
    blocks = []
    for name in ("imap", "pop3"):
        service = dict(gw.services()).get(name)
        body = deny
        if service is not None:
            body = [*deny[:3], f"default_fields = {_proxy_fields(gw, name, service)}"]
        blocks.append(
            "\n".join(
                [f"protocol {name} {{", "  passdb {", *(f"    {b}" for b in body), "  }", "}"]
            )
        )
    smtp = deny
    if gw.imap is not None:
        smtp = [
            "driver = imap",
            f"username_filter = {users}",
            f"args = {_imapc_args(gw)}",
            "result_failure = return-fail",
            "result_internalfail = return-fail",
        ]
    blocks.append("\n".join(["passdb {", *(f"  {b}" for b in smtp), "}"]))
    return "\n".join(blocks)


def local_passdb_filter(gw: GatewayConfig) -> str:
    """The local users file never answers for a backend domain (no password of theirs
    is ever checked or kept here)."""
    return "  username_filter = " + " ".join(f"!*@{d}" for d in gw.domains)
