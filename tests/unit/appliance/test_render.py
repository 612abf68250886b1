"""Each [mail] setting appears in the rendered Postfix/Dovecot files as the line enforcing it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trustme

from postwarden.appliance.render import Layout, RenderError, check_tls_files, render_all
from postwarden.config.loading import ConfigError, parse_config
from postwarden.config.model import Config
from tests.unit.config.config_files import mail_config

cfg = mail_config  # a config with this [mail] table


def files(config: Config | None = None, layout: Layout | None = None) -> dict[str, str]:
    return render_all(config or cfg(), layout or Layout.debian())


def main_cf(config: Config | None = None, layout: Layout | None = None) -> dict[str, str]:
    """main.cf as {parameter: value}, continuation lines joined."""
    params: dict[str, str] = {}
    key = ""
    for line in files(config, layout)["postfix/main.cf"].splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace():
            params[key] += " " + line.strip()
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        params[key] = value.strip()
    return params


def master_cf(config: Config | None = None, layout: Layout | None = None) -> str:
    return files(config, layout)["postfix/master.cf"]


def dovecot(config: Config | None = None, layout: Layout | None = None) -> str:
    return files(config, layout)["dovecot/dovecot.conf"]


def test_empty_config_renders() -> None:
    out = render_all(Config(), Layout.debian())
    assert set(out) >= {"postfix/main.cf", "postfix/master.cf", "dovecot/dovecot.conf"}
    assert "@{" not in "".join(out.values())


def test_mailbox_check_first_and_policyd_after_anti_relay() -> None:
    params = main_cf()
    parts = [p.strip() for p in params["smtpd_recipient_restrictions"].split(",", 5)]
    # Local recipients are verified for every client, trusted and logged-in ones included.
    assert parts[:5] == [
        "$local_recipient_check",
        "permit_mynetworks",
        "permit_sasl_authenticated",
        "reject_unauth_destination",
        "check_sender_access regexp:$config_directory/local_sender_domains",
    ]
    assert params["local_recipient_check"] == (
        "check_recipient_access regexp:$config_directory/address_literals, "
        "check_recipient_access texthash:$config_directory/mailbox_domains"
    )
    assert parts[5].startswith("check_policy_service { unix:")
    assert "timeout=30s" in parts[5] and "default_action = DEFER_IF_PERMIT" in parts[5]
    assert params["submission_recipient_restrictions"] == (
        "$local_recipient_check, permit_sasl_authenticated, reject"
    )


def test_policy_check_takes_timeout_unreachable_action_and_idle_time_from_policyd() -> None:
    """What Postfix does when policyd is slow, silent or idle follows the [policyd] keys."""
    defaults = main_cf()
    unreachable = "DEFER_IF_PERMIT policy service unavailable; try again later"
    assert (
        f"timeout=30s, {{ default_action = {unreachable} }} }}"
        in defaults["smtpd_recipient_restrictions"]
    )
    assert defaults["smtpd_policy_service_default_action"] == unreachable
    assert defaults["smtpd_policy_service_max_idle"] == "300s"
    # policyd.default_action is what a running policyd answers on its own failures: it is
    # not Postfix's business.
    policyd = {"request_timeout": 4, "unreachable_action": "DUNNO", "idle_timeout": 60}
    params = main_cf(parse_config({"policyd": {**policyd, "default_action": "DEFER_IF_PERMIT"}}))
    assert "timeout=4s, { default_action = DUNNO } }" in params["smtpd_recipient_restrictions"]
    assert params["smtpd_policy_service_default_action"] == "DUNNO"
    assert params["smtpd_policy_service_max_idle"] == "60s"


def test_fractional_policyd_seconds_round_up_to_whole_postfix_seconds() -> None:
    # Postfix time values are whole seconds: rounding down could make Postfix give up first.
    params = main_cf(parse_config({"policyd": {"request_timeout": 2.5, "idle_timeout": 0.2}}))
    assert "timeout=3s," in params["smtpd_recipient_restrictions"]
    assert params["smtpd_policy_service_max_idle"] == "1s"


def test_unknown_mailboxes_in_our_domains_are_verified_at_rcpt() -> None:
    out = files(cfg(additional_domains=["example.org"], relay_domains=["in.example.net|10.0.0.1"]))
    assert out["postfix/mailbox_domains"] == (
        "example.com verify_mailbox\nexample.org verify_mailbox\n"
    )
    params = main_cf()
    assert params["smtpd_restriction_classes"] == "verify_mailbox"
    assert params["verify_mailbox"] == "reject_unverified_recipient"


def test_policyd_and_milterd_sockets_inside_the_chroot_are_relative() -> None:
    config = parse_config(
        {
            "policyd": {"listen": ["unix:/var/spool/postfix/postwarden/policyd.sock"]},
            "milterd": {"listen": ["inet:127.0.0.1:8891"]},
        }
    )
    params = main_cf(config)
    assert (
        "check_policy_service { unix:postwarden/policyd.sock,"
        in (params["smtpd_recipient_restrictions"])
    )
    assert params["smtpd_milters"] == "inet:127.0.0.1:8891"
    assert params["non_smtpd_milters"] == "inet:127.0.0.1:8891"
    assert params["milter_default_action"] == "tempfail"
    assert params["milter_protocol"] == "6"


def test_xclient_only_in_test_layouts() -> None:
    assert main_cf()["smtpd_authorized_xclient_hosts"] == ""
    from dataclasses import replace

    layout = replace(Layout.debian(), xclient_hosts=("127.0.0.0/8",))
    assert main_cf(layout=layout)["smtpd_authorized_xclient_hosts"] == "127.0.0.0/8"


def test_identity_and_helo() -> None:
    params = main_cf(cfg(helo_name="out.example.com"))
    assert params["myhostname"] == "mx.example.com"
    assert params["mydomain"] == "example.com"
    assert params["smtp_helo_name"] == "out.example.com"
    assert main_cf()["smtp_helo_name"] == "mx.example.com"


def test_local_domains_go_to_dovecot_over_lmtp() -> None:
    params = main_cf(cfg(additional_domains=["example.org", "Example.NET."]))
    assert params["virtual_mailbox_domains"] == "example.com example.org example.net"
    assert params["virtual_transport"] == "lmtp:unix:private/dovecot-lmtp"
    assert params["mydestination"] == ""
    conf = dovecot()
    assert "unix_listener /var/spool/postfix/private/dovecot-lmtp {" in conf


def test_relay_domains_by_ip_and_host() -> None:
    out = files(
        cfg(relay_domains=["inside.example.com|10.20.30.40", "lan.example.com | mx.lan:2525"])
    )
    assert "relay_domains = inside.example.com lan.example.com" in out["postfix/main.cf"]
    assert out["postfix/transport"] == (
        "inside.example.com relay:[10.20.30.40]:25\nlan.example.com relay:[mx.lan]:2525\n"
    )


def test_listen_interfaces_and_ipv6() -> None:
    assert main_cf(cfg(listen="loopback"))["inet_interfaces"] == "loopback-only"
    assert main_cf(cfg(listen="all"))["inet_interfaces"] == "all"
    assert main_cf(cfg(ipv6=False))["inet_protocols"] == "ipv4"
    assert main_cf(cfg(ipv6=True))["inet_protocols"] == "all"
    assert re.search(r"^listen = 127\.0\.0\.1$", dovecot(cfg(listen="loopback", ipv6=False)), re.M)
    assert re.search(r"^listen = \*, ::$", dovecot(cfg(listen="all", ipv6=True)), re.M)


def test_smtp_ports_submission_enforces_starttls_and_smtps_is_wrapper_mode() -> None:
    text = master_cf(cfg(smtp_port=2525, submission_port=1587, smtps_port=1465))
    blocks = {b.split()[0]: b for b in re.split(r"\n(?=\S)", text) if b.strip()}
    assert blocks["2525"].split()[1:3] == ["inet", "n"]
    assert "smtpd_tls_security_level=encrypt" in blocks["1587"]
    assert "smtpd_tls_wrappermode" not in blocks["1587"]
    assert "smtpd_tls_wrappermode=yes" in blocks["1465"]
    for name in ("1587", "1465"):
        assert "smtpd_recipient_restrictions=$submission_recipient_restrictions" in blocks[name]
    assert "postlog   unix-dgram" in text


def test_disabled_submission_ports_are_not_listened_on() -> None:
    text = master_cf(cfg(submission=False, smtps=False))
    assert not re.search(r"^(587|465)\s", text, re.M)


def test_imap_pop3_ports_on_and_off() -> None:
    conf = dovecot(cfg(imap_port=1143, imaps=False, pop3=True, pop3_port=1110))
    assert re.search(r"inet_listener imap \{\s*port = 1143", conf)
    assert re.search(r"inet_listener imaps \{\s*port = 0", conf)
    assert re.search(r"inet_listener pop3 \{\s*port = 1110", conf)
    assert re.search(r"inet_listener pop3s \{\s*port = 0", conf)
    assert "protocols = imap pop3 lmtp" in conf
    no_pop = dovecot(cfg(pop3=False, pop3s=False))
    assert "protocols = imap lmtp" in no_pop


def test_connection_limits_and_idle_timeout() -> None:
    params = main_cf(cfg(max_connections=40, max_connections_per_client=5, idle_timeout=90))
    assert "default_process_limit" not in params  # LMTP/SMTP clients keep their own limits
    assert re.search(
        r"^25\s+inet\s+n\s+-\s+y\s+-\s+40\s+smtpd", master_cf(cfg(max_connections=40)), re.M
    )
    assert params["smtpd_client_connection_count_limit"] == "5"
    assert params["smtpd_timeout"] == "90s"


def test_message_size_limit() -> None:
    assert main_cf(cfg(message_size_limit=10_485_760))["message_size_limit"] == "10485760"
    with pytest.raises(ConfigError, match="message_size_limit"):
        cfg(message_size_limit=10)


def test_mailbox_quota_and_trash_retention() -> None:
    conf = dovecot(cfg(mailbox_quota_mb=512, trash_retention_days=14))
    assert "quota_rule = *:storage=512M" in conf
    assert "quota = count:User quota" in conf
    assert re.search(r"mailbox Trash \{[^}]*autoexpunge = 14d", conf)
    unlimited = dovecot(cfg(mailbox_quota_mb=0, trash_retention_days=0))
    assert "quota_rule" not in unlimited
    assert "autoexpunge" not in unlimited


def test_sasl_and_tls_only_auth() -> None:
    params = main_cf(cfg(sasl=True, tls_only_auth=True))
    # AUTH is a submission-port service only (master.cf turns it on there).
    assert params["smtpd_sasl_auth_enable"] == "no"
    assert params["smtpd_sasl_type"] == "dovecot"
    assert params["smtpd_sasl_path"] == "private/auth"
    assert params["smtpd_tls_auth_only"] == "yes"
    off = main_cf(cfg(sasl=False, submission=False, smtps=False, tls_only_auth=False))
    assert off["smtpd_sasl_auth_enable"] == "no"
    assert off["smtpd_tls_auth_only"] == "no"
    assert "unix_listener /var/spool/postfix/private/auth {" in dovecot()


def test_imap_pop3_require_tls() -> None:
    assert re.search(r"^ssl = required$", dovecot(cfg(imap_pop3_require_tls=True)), re.M)
    assert re.search(r"^disable_plaintext_auth = yes$", dovecot(), re.M)
    assert re.search(r"^ssl = yes$", dovecot(cfg(imap_pop3_require_tls=False)), re.M)


def test_tls_given_certificate_or_self_signed() -> None:
    given = cfg(tls={"cert": "/etc/ssl/mx.pem", "key": "/etc/ssl/mx.key", "ca": "/etc/ssl/ca.pem"})
    params = main_cf(given)
    assert params["smtpd_tls_cert_file"] == "/etc/ssl/mx.pem"
    assert params["smtpd_tls_key_file"] == "/etc/ssl/mx.key"
    assert params["smtp_tls_CAfile"] == "/etc/ssl/ca.pem"
    assert "ssl_cert = </etc/ssl/mx.pem" in dovecot(given)
    layout = Layout.debian()
    assert main_cf()["smtpd_tls_cert_file"] == str(layout.self_signed_cert)
    assert f"ssl_key = <{layout.self_signed_key}" in dovecot()
    with pytest.raises(ConfigError, match="together"):
        cfg(tls={"cert": "/etc/ssl/mx.pem"})


def _relays(tmp_path: Path) -> Config:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    return cfg(
        relays=[
            {
                "name": "isp",
                "host": "smtp.isp.example",
                "port": 587,
                "username": "me",
                "password_file": str(secret),
                "starttls": "required",
                "timeout": 20,
            },
            {
                "name": "secure",
                "protocol": "smtps",
                "host": "192.0.2.10",
                "sender_domains": ["sales.example.com", "example.org"],
            },
            {
                "name": "plain",
                "host": "relay.lan",
                "starttls": "disabled",
                "sender_domains": ["x.test"],
            },
        ]
    )


def test_outbound_relays_by_sender_domain(tmp_path: Path) -> None:
    out = files(_relays(tmp_path))
    main = out["postfix/main.cf"]
    assert "default_transport = relay_isp:[smtp.isp.example]:587" in main
    assert (
        "sender_dependent_default_transport_maps = texthash:$config_directory/sender_relays" in main
    )
    assert out["postfix/sender_relays"] == (
        "@sales.example.com relay_secure:[192.0.2.10]:465\n"
        "@example.org relay_secure:[192.0.2.10]:465\n"
        "@x.test relay_plain:[relay.lan]:25\n"
    )
    assert out["postfix/relay_passwords"] == "[smtp.isp.example]:587 me:s3cret\n"
    master = out["postfix/master.cf"]
    blocks = {b.split()[0]: b for b in re.split(r"\n(?=\S)", master) if b.strip()}
    isp, secure, plain = blocks["relay_isp"], blocks["relay_secure"], blocks["relay_plain"]
    assert "smtp_tls_security_level=encrypt" in isp and "smtp_tls_wrappermode=no" in isp
    assert "smtp_sasl_auth_enable=yes" in isp and "smtp_connect_timeout=20s" in isp
    assert "smtp_tls_wrappermode=yes" in secure and "smtp_tls_security_level=encrypt" in secure
    assert "smtp_sasl_auth_enable" not in secure
    assert "smtp_tls_security_level=none" in plain


def _relay_blocks(config: Config) -> dict[str, str]:
    return {b.split()[0]: b for b in re.split(r"\n(?=\S)", master_cf(config)) if b.strip()}


def test_tls_ca_makes_mandatory_tls_relays_verify(tmp_path: Path) -> None:
    relays = _relays(tmp_path).mail.relays
    with_ca = cfg(relays=[r.model_dump() for r in relays], tls={"ca": "/etc/ssl/relay-ca.pem"})
    blocks = _relay_blocks(with_ca)
    # STARTTLS required and smtps: the certificate must chain to the CA (and name the host).
    for name in ("relay_isp", "relay_secure"):
        assert "smtp_tls_security_level=verify" in blocks[name], blocks[name]
        assert "smtp_tls_CAfile=/etc/ssl/relay-ca.pem" in blocks[name], blocks[name]
    # STARTTLS off stays off; "enabled" stays opportunistic (verifying would bounce on "may").
    assert "smtp_tls_security_level=none" in blocks["relay_plain"]
    enabled = cfg(relays=[{"name": "o", "host": "h.example"}], tls={"ca": "/c.pem"})
    assert "smtp_tls_security_level=may" in _relay_blocks(enabled)["relay_o"]
    # Without a CA, mandatory TLS encrypts without checking the certificate.
    blocks = _relay_blocks(_relays(tmp_path))
    for name in ("relay_isp", "relay_secure"):
        assert "smtp_tls_security_level=encrypt" in blocks[name], blocks[name]
        assert "smtp_tls_CAfile" not in blocks[name]


def test_next_hop_names_are_also_looked_up_in_the_hosts_file() -> None:
    params = main_cf(cfg(relay_domains=["corp.example|inside-mx:2525"]))
    assert params["smtp_host_lookup"] == "dns, native"
    # Brackets: the named host itself, no MX lookup for corp.example.
    out = files(cfg(relay_domains=["corp.example|inside-mx:2525"]))
    assert out["postfix/transport"] == "corp.example relay:[inside-mx]:2525\n"


def test_relay_password_never_in_main_or_master(tmp_path: Path) -> None:
    out = files(_relays(tmp_path))
    assert "s3cret" not in out["postfix/main.cf"] + out["postfix/master.cf"]


def test_unreadable_relay_password_is_a_render_error(tmp_path: Path) -> None:
    config = cfg(
        relays=[
            {
                "name": "isp",
                "host": "h.example",
                "username": "u",
                "password_file": str(tmp_path / "none"),
            }
        ]
    )
    with pytest.raises(RenderError, match="cannot read password_file"):
        files(config)


def test_copies_of_incoming_and_outgoing_mail() -> None:
    out = files(
        cfg(
            additional_domains=["example.org"],
            copy_incoming_to="archive-in@example.com",
            copy_outgoing_to="archive-out@example.com",
        )
    )
    assert out["postfix/recipient_bcc"] == (
        "@example.com archive-in@example.com\n@example.org archive-in@example.com\n"
    )
    assert out["postfix/sender_bcc"] == (
        "@example.com archive-out@example.com\n@example.org archive-out@example.com\n"
    )
    params = main_cf()
    assert params["recipient_bcc_maps"] == "texthash:$config_directory/recipient_bcc"
    assert params["sender_bcc_maps"] == "texthash:$config_directory/sender_bcc"
    with pytest.raises(ConfigError, match="not a mail address"):
        cfg(copy_incoming_to="archive")


def test_connection_control_accept_all_except() -> None:
    out = files(
        cfg(
            connection_control={
                "mode": "accept-all-except",
                "addresses": ["192.0.2.7", "198.51.100.0:255.255.255.0", "10.1.*", "2001:db8::/32"],
            }
        )
    )
    assert out["postfix/client_access"].splitlines() == [
        f"{net} REJECT 5.7.1 Connection refused by policy"
        for net in ("192.0.2.7/32", "198.51.100.0/24", "10.1.0.0/16", "2001:db8::/32")
    ]
    assert "smtpd_client_restrictions = check_client_access cidr:" in out["postfix/main.cf"]


def test_connection_control_deny_all_except() -> None:
    config = cfg(connection_control={"mode": "deny-all-except", "addresses": ["192.168.1.*"]})
    assert files(config)["postfix/client_access"] == "192.168.1.0/24 OK\n"
    assert main_cf(config)["smtpd_client_restrictions"] == (
        "permit_mynetworks, check_client_access cidr:$config_directory/client_access, reject"
    )


# The sample IP list from the seed's "Import from file" (003), one entry per line.
SEED_IP_LIST = """192.168.1.1
192.168.2.0:255.255.255.0
192.168.3.1:255.255.255.128
192.168.4.100
192.168.5.32:255.255.255.192
2001:db8:10ff::ae:44f2
2001:db8::/32
"""


def test_connection_control_file_in_the_seed_format_is_merged(tmp_path: Path) -> None:
    listed = tmp_path / "ips.txt"
    listed.write_text("# imported\n" + SEED_IP_LIST + "\n10.9.*  # wildcard\n192.0.2.7\n")
    config = cfg(connection_control={"addresses": ["192.0.2.7"], "addresses_file": str(listed)})
    nets = [line.split()[0] for line in files(config)["postfix/client_access"].splitlines()]
    assert nets == [
        "192.0.2.7/32",  # from the table; the same entry in the file is not repeated
        "192.168.1.1/32",
        "192.168.2.0/24",
        "192.168.3.0/25",
        "192.168.4.100/32",
        "192.168.5.0/26",
        "2001:db8:10ff::ae:44f2/128",
        "2001:db8::/32",
        "10.9.0.0/16",
    ]


def test_bad_line_in_the_connection_control_file_is_named(tmp_path: Path) -> None:
    listed = tmp_path / "ips.txt"
    listed.write_text("192.168.1.1\n\n192.168.1.300\n")
    config = cfg(connection_control={"addresses_file": str(listed)})
    with pytest.raises(RenderError, match=rf"addresses_file: {re.escape(str(listed))}:3: "):
        files(config)
    missing = cfg(connection_control={"addresses_file": str(tmp_path / "absent.txt")})
    with pytest.raises(RenderError, match=r"cannot read .*absent\.txt.*No such file"):
        files(missing)


def test_trusted_networks_become_mynetworks() -> None:
    config = parse_config({"network": {"trusted": ["127.0.0.0/8", "::1/128", "192.168.0.0/16"]}})
    assert main_cf(config)["mynetworks"] == "127.0.0.0/8 [::1]/128 192.168.0.0/16"


def test_smtputf8_and_delivery_defaults() -> None:
    params = main_cf()
    # Dovecot 2.3's LMTP cannot carry SMTPUTF8: not offered, so refused at MAIL.
    assert params["smtputf8_enable"] == "no"
    assert params["mailbox_transport"] == "lmtp:unix:private/dovecot-lmtp"


def test_test_layout_has_no_chroot_and_absolute_sockets(tmp_path: Path) -> None:
    from tests.fixtures.mail_system import make_test_config, private_layout

    layout = private_layout(tmp_path, {"smtp_port": 10025}, policyd="unix:/p.sock", milterd="")
    params = main_cf(make_test_config(), layout)
    assert params["virtual_transport"] == f"lmtp:unix:{tmp_path}/sockets/lmtp"
    assert params["smtpd_milters"] == ""
    assert params["maillog_file"] == f"{tmp_path}/log/postfix.log"
    assert re.search(r"^10025\s+inet\s+n\s+-\s+n\s", master_cf(make_test_config(), layout), re.M)


def _tls_config(tmp_path: Path, cert_name: str, *, other_key: bool = False) -> Config:
    ca = trustme.CA()
    issued = ca.issue_cert(cert_name)
    cert, key = tmp_path / "mx.pem", tmp_path / "mx.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    (ca.issue_cert("other.test") if other_key else issued).private_key_pem.write_to_path(str(key))
    return cfg(tls={"cert": str(cert), "key": str(key)})


def test_certificate_for_the_hostname_is_accepted(tmp_path: Path) -> None:
    check_tls_files(_tls_config(tmp_path, "mx.example.com"))
    check_tls_files(_tls_config(tmp_path, "*.example.com"))


def test_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=r"is for www\.example\.com, not for mail\.hostname"):
        check_tls_files(_tls_config(tmp_path, "www.example.com"))
    with pytest.raises(RenderError, match=r"not for mail\.hostname"):
        check_tls_files(_tls_config(tmp_path, "*.mx.example.com"))


def test_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="is not the key of"):
        check_tls_files(_tls_config(tmp_path, "mx.example.com", other_key=True))


def test_unreadable_or_non_pem_certificate_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("junk")
    (tmp_path / "k.pem").write_text("junk")
    with pytest.raises(RenderError, match="cannot read"):
        check_tls_files(cfg(tls={"cert": str(tmp_path / "none"), "key": str(tmp_path / "k.pem")}))
    with pytest.raises(RenderError, match="not a PEM certificate"):
        check_tls_files(
            cfg(tls={"cert": str(tmp_path / "junk.pem"), "key": str(tmp_path / "k.pem")})
        )


def test_forwarding_aliases_come_live_from_policyd_socketmap() -> None:
    assert main_cf()["virtual_alias_maps"] == "texthash:$config_directory/postmaster_aliases"
    config = parse_config(
        {"policyd": {"aliases_listen": "unix:/var/spool/postfix/postwarden/aliases.sock"}}
    )
    # The static postmaster/abuse table first: no stored alias can take those over.
    assert main_cf(config)["virtual_alias_maps"] == (
        "texthash:$config_directory/postmaster_aliases, "
        "socketmap:unix:postwarden/aliases.sock:aliases"
    )


# --- hardening (README "Security") ---------------------------------------------------------


def _services(config: Config | None = None) -> dict[str, str]:
    return {b.split()[0]: b for b in re.split(r"\n(?=\S)", master_cf(config)) if b.strip()}


def test_smuggling_protection_on_by_default_for_every_client() -> None:
    params = main_cf()
    assert params["smtpd_forbid_bare_newline"] == "normalize"
    # Not even trusted networks are excluded (Postfix's default would be $mynetworks).
    assert params["smtpd_forbid_bare_newline_exclusions"] == ""
    assert params["smtpd_forbid_unauth_pipelining"] == "yes"
    assert params["smtpd_data_restrictions"].startswith("reject_unauth_pipelining, ")
    off = main_cf(cfg(smuggling_protection=False))
    assert off["smtpd_forbid_bare_newline"] == "no"
    assert off["smtpd_forbid_unauth_pipelining"] == "no"
    assert "reject_unauth_pipelining" not in off["smtpd_data_restrictions"]


def test_policyd_is_asked_at_data_for_the_queue_id_by_port_25_clients_only() -> None:
    # The DATA-stage request carries the queue id that joins policyd's RCPT lines (same
    # instance) to Postfix's; trusted and logged-in clients never wait for policyd.
    data = main_cf()["smtpd_data_restrictions"]
    head, _, check = data.partition(", check_policy_service ")
    assert head == "reject_unauth_pipelining, permit_mynetworks, permit_sasl_authenticated"
    assert check.startswith("{ unix:/run/postwarden/policyd.sock, timeout=30s")
    for port in ("587", "465"):
        assert "-o smtpd_data_restrictions=reject_unauth_pipelining\n" in (_services()[port] + "\n")


def test_submission_ports_bind_the_sender_to_the_login() -> None:
    params = main_cf()
    assert params["submission_sender_restrictions"] == (
        "reject_sender_login_mismatch, permit_sasl_authenticated, reject"
    )
    for port in ("587", "465"):
        assert "smtpd_sender_restrictions=$submission_sender_restrictions" in _services()[port]
    # Port 25 has no login to bind to: it keeps main.cf's (empty) sender restrictions.
    assert "smtpd_sender_restrictions" not in _services()["25"]
    assert params["smtpd_sender_login_maps"] == (
        "unionmap:{regexp:$config_directory/sender_identity, "
        "texthash:$config_directory/sender_grants, "
        "regexp:$config_directory/sender_domain_grants}"
    )
    assert files()["postfix/sender_identity"] == "/^([^[:space:],]+)$/ ${1}\n"


def test_sender_owners_include_alias_targets_when_policyd_serves_aliases() -> None:
    config = parse_config(
        {"policyd": {"aliases_listen": "unix:/var/spool/postfix/postwarden/aliases.sock"}}
    )
    maps = main_cf(config)["smtpd_sender_login_maps"]
    assert maps.endswith(", socketmap:unix:postwarden/aliases.sock:aliases}"), maps


def test_sender_grants_are_rendered_keyed_by_the_granted_address() -> None:
    out = files(
        cfg(
            sender_grants={
                "Alice@Example.com": ["CEO@example.com", "@Example.ORG", "sales@example.com"],
                "bob@example.com": ["sales@example.com", "@example.org", "@my-shop.example"],
            }
        )
    )
    assert out["postfix/sender_grants"] == (
        "ceo@example.com alice@example.com\nsales@example.com alice@example.com,bob@example.com\n"
    )
    # Whole domains are regexps on the full address: the domain itself, not its subdomains.
    assert out["postfix/sender_domain_grants"] == (
        "/@example\\.org$/ alice@example.com,bob@example.com\n"
        "/@my-shop\\.example$/ bob@example.com\n"
    )
    with pytest.raises(ConfigError, match="not a mail address"):
        cfg(sender_grants={"alice": ["x@example.com"]})


def test_forged_local_senders_refused_on_port_25_unless_turned_off() -> None:
    out = files(cfg(additional_domains=["example.org"]))
    assert out["postfix/local_sender_domains"].splitlines() == [
        f"/@{d}$/ 550 5.7.1 Sender address in our own domain {d.replace(chr(92), '')}: "
        "log in to send (submission) or send from a trusted network"
        for d in ("example\\.com", "example\\.org")
    ]
    off = main_cf(cfg(reject_forged_local_senders=False))
    assert "local_sender_domains" not in off["smtpd_recipient_restrictions"]


def test_recipients_live_from_policyd_mailboxes_map_when_served() -> None:
    both = parse_config(
        {
            "policyd": {
                "aliases_listen": "unix:/var/spool/postfix/postwarden/aliases.sock",
                "mailbox_lmtp": "unix:/run/dovecot/postwarden-lmtp",
            }
        }
    )
    params = main_cf(both)
    assert params["virtual_mailbox_maps"] == "socketmap:unix:postwarden/aliases.sock:mailboxes"
    # No verify probe (and so no verify cache) in front of it.
    assert params["local_recipient_check"] == (
        "check_recipient_access regexp:$config_directory/address_literals, "
        "reject_unlisted_recipient"
    )
    # Dovecot opens the socket policyd probes, for the postfix group policyd runs in; in
    # Dovecot's base_dir (/run/dovecot) it is named relatively, as doveconf asks.
    assert re.search(
        r"unix_listener postwarden-lmtp \{\s*mode = 0660\s*user = postfix\s*"
        r"group = postfix\s*\}",
        dovecot(both),
    )
    # Only one of the two set: no map, the probe stays.
    for policyd in (
        {"aliases_listen": "unix:/var/spool/postfix/postwarden/aliases.sock"},
        {"mailbox_lmtp": "unix:/run/dovecot/postwarden-lmtp"},
    ):
        assert main_cf(parse_config({"policyd": policyd}))["virtual_mailbox_maps"] == ""
    assert "postwarden-lmtp" not in dovecot()
    elsewhere = parse_config({"policyd": {"mailbox_lmtp": "unix:/var/spool/postfix/pw/lmtp"}})
    assert "unix_listener /var/spool/postfix/pw/lmtp {" in dovecot(elsewhere)
    # An inet mailbox_lmtp is Dovecot's operator's to open: no unix listener for it.
    tcp = parse_config({"policyd": {"mailbox_lmtp": "inet:127.0.0.1:24"}})
    assert dovecot(tcp).count("unix_listener") == 2


def test_layout_may_point_the_mailbox_map_at_a_test_socket() -> None:
    from dataclasses import replace

    layout = replace(Layout.debian(), virtual_mailbox_maps="socketmap:unix:/t/m.sock:mailboxes")
    params = main_cf(layout=layout)
    assert params["virtual_mailbox_maps"] == "socketmap:unix:/t/m.sock:mailboxes"
    assert params["local_recipient_check"].endswith(", reject_unlisted_recipient")


def test_verify_probe_fallback_keeps_no_persistent_or_long_cache() -> None:
    params = main_cf()
    assert params["address_verify_map"] == ""  # in memory only: no verify_cache file
    assert params["address_verify_positive_refresh_time"] == "60s"
    assert params["address_verify_positive_expire_time"] == "5m"
    assert params["address_verify_negative_refresh_time"] == "60s"
    assert params["address_verify_negative_expire_time"] == "5m"


def test_address_literal_recipients_are_refused() -> None:
    table = files()["postfix/address_literals"]
    assert table == (
        "/@\\[.*\\]$/ 550 5.1.2 Address literals (user@[address]) are not accepted here\n"
    )
    assert main_cf()["submission_recipient_restrictions"].startswith("$local_recipient_check")


def test_postmaster_and_abuse_of_every_domain() -> None:
    out = files(cfg(additional_domains=["example.org"]))
    assert out["postfix/postmaster_aliases"].splitlines() == [
        "postmaster@example.com postmaster@example.com",
        "abuse@example.com postmaster@example.com",
        "postmaster@example.org postmaster@example.com",
        "abuse@example.org postmaster@example.com",
    ]
    given = cfg(postmaster_address="ops@example.com")
    assert set(files(given)["postfix/postmaster_aliases"].split()[1::2]) == {"ops@example.com"}
    assert "postmaster_address = ops@example.com" in dovecot(given)


def test_small_protocol_hardening() -> None:
    params = main_cf()
    assert params["disable_vrfy_command"] == "yes"
    assert params["message_reject_characters"] == "\\0"
    assert params["smtpd_helo_restrictions"].strip() == (
        "permit_mynetworks, permit_sasl_authenticated, "
        "reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname"
    )
    # DSN: not on port 25 (success notices would go to forged senders), kept on 587/465.
    services = _services()
    assert "smtpd_discard_ehlo_keywords=silent-discard,dsn" in services["25"]
    assert "smtpd_discard_ehlo_keywords" not in services["587"] + services["465"]


def test_auth_only_on_submission_ports_and_rate_limited() -> None:
    assert main_cf()["smtpd_sasl_auth_enable"] == "no"
    services = _services(cfg(auth_rate_limit=7))
    assert "smtpd_sasl_auth_enable" not in services["25"]
    for port in ("587", "465"):
        assert "smtpd_sasl_auth_enable=yes" in services[port]
        assert "smtpd_client_auth_rate_limit=7" in services[port]


def test_no_anonymous_or_static_rsa_suites_where_tls_is_mandatory() -> None:
    assert main_cf()["smtpd_tls_mandatory_exclude_ciphers"] == "aNULL, kRSA"
    suites = re.search(r"^ssl_cipher_list = (.*)$", dovecot(), re.M)
    assert suites is not None
    assert {"!aNULL", "!kRSA"} <= set(suites.group(1).replace("@", ":").split(":"))


def test_port_25_logs_under_postfix_own_name() -> None:
    services = _services()
    assert "syslog_name" not in services["25"]
    assert "syslog_name=postfix/submission" in services["587"]
    assert "syslog_name=postfix/smtps" in services["465"]


def test_dovecot_lmtp_runs_as_the_mail_user() -> None:
    block = re.search(r"^service lmtp \{\n(.*?)^\}", dovecot(), re.M | re.S)
    assert block is not None
    assert re.match(r"\s*user = vmail\n", block.group(1)), block.group(1)


def test_our_users_mail_gets_date_and_message_id_before_milterd_signs_it() -> None:
    # milterd oversigns both; Postfix's default adds them only for its own interfaces.
    assert main_cf()["local_header_rewrite_clients"] == (
        "permit_mynetworks, permit_sasl_authenticated"
    )


def test_a_dovecot_or_milterd_outage_holds_mail_briefly() -> None:
    # README "Reliability": a dead LMTP destination is retried after 30 s, not 300 s, and a
    # frozen milterd holds a session for 5-10 s, not 30 s.
    params = main_cf()
    assert params["minimal_backoff_time"] == "30s"
    assert params["queue_run_delay"] == "30s"
    assert params["milter_connect_timeout"] == "5s"
    assert params["milter_command_timeout"] == "10s"
    assert params["milter_default_action"] == "tempfail"


def test_no_domain_is_classified_through_the_alias_socketmap() -> None:
    # smtpd caches the resolver's answers, failures included: a domain list that depended
    # on the socketmap kept a mapd outage's 451 alive in every smtpd process that saw it.
    assert main_cf()["virtual_alias_domains"] == ""


def test_with_frontd_postfix_talks_to_its_front_ends_and_dovecot_listens_behind_them() -> None:
    front = {
        "enabled": True,
        "milter_listen": "unix:/var/spool/postfix/postwarden/milter-front.sock",
        "sasl_listen": "unix:/var/spool/postfix/postwarden/auth-front.sock",
        "sasl_upstream": "unix:/run/dovecot/postwarden-auth",
    }
    config = parse_config(
        {
            "milterd": {"listen": ["unix:/var/spool/postfix/postwarden/milterd.sock"]},
            "frontd": front,
        }
    )
    params = main_cf(config)
    assert params["smtpd_milters"] == "unix:postwarden/milter-front.sock"
    assert params["non_smtpd_milters"] == "unix:postwarden/milter-front.sock"
    assert params["smtpd_sasl_path"] == "postwarden/auth-front.sock"
    assert "unix_listener /run/dovecot/postwarden-auth {" in dovecot(config)
    # Off (the default), both talk to each other directly, as before.
    off = parse_config({"frontd": {**front, "enabled": False}})
    assert main_cf(off)["smtpd_sasl_path"] == "private/auth"
    assert main_cf(off)["smtpd_milters"] == "unix:/run/postwarden/milterd.sock"
    assert "unix_listener /var/spool/postfix/private/auth {" in dovecot(off)
