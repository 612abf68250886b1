"""Gateway mode as rendered: each line docs/gateway-mode.md relies on, and no other way in."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trustme

from postwarden.appliance.render import Layout, RenderError, check_tls_files, render_all
from postwarden.config.loading import parse_config
from postwarden.config.model import Config

MAIL = {"hostname": "mx.example.test", "main_domain": "example.test"}


def gateway_config(**overrides: Any) -> Config:
    table: dict[str, Any] = {
        "enabled": True,
        "domains": ["corp.test", "corp2.test"],
        "ca": "/etc/postwarden/backend-ca.pem",
        "certificate_name": "backend.test",
        "smtp": {"host": "192.0.2.10"},
        "imap": {"host": "192.0.2.10"},
        "pop3": {"host": "192.0.2.10", "security": "tls"},
    }
    table.update(overrides)
    return parse_config({"mail": MAIL, "gateway": table})


def rendered(config: Config) -> dict[str, str]:
    return render_all(config, Layout.debian(systemd=True))


def blocks(text: str, head: str) -> list[str]:
    """Every `head {…}` block of dovecot.conf (nested braces followed)."""
    out = []
    for match in re.finditer(re.escape(head) + r" \{", text):
        depth, end = 0, match.start()
        for end in range(match.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        out.append(text[match.start() : end + 1])
    return out


def master_services(master: str) -> dict[str, list[str]]:
    """master.cf as {service name: its -o options}."""
    services: dict[str, list[str]] = {}
    name = ""
    for line in master.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if not line[0].isspace():
            name = line.split()[0]
            services[name] = []
        elif line.strip().startswith("-o "):
            services[name].append(line.strip()[3:])
    return services


def top_level_passdbs(text: str) -> list[str]:
    """The passdb blocks outside any protocol block: the ones Postfix's SASL reaches."""
    inside = "".join(blocks(text, "protocol imap") + blocks(text, "protocol pop3"))
    return [b for b in blocks(text, "passdb") if b not in inside]


def test_imap_and_pop3_logins_are_proxied_by_a_static_passdb_only_inside_their_protocols() -> None:
    dovecot = rendered(gateway_config())["dovecot/dovecot.conf"]
    (imap,) = [b for b in blocks(dovecot, "protocol imap") if "passdb" in b]
    (pop3,) = [b for b in blocks(dovecot, "protocol pop3") if "passdb" in b]
    assert "nopassword=y" in imap and "username_filter = *@corp.test *@corp2.test" in imap
    # Dovecot checks the certificate against host; hostip pins the configured address.
    fields = "proxy=y host=backend.test hostip=192.0.2.10"
    assert f"default_fields = {fields} port=143 starttls=yes" in imap
    assert f"default_fields = {fields} port=995 ssl=yes" in pop3
    # P1: outside the protocol blocks a nopassword passdb would take any SMTP password.
    assert not any("nopassword" in b for b in top_level_passdbs(dovecot))
    assert "proxy_maybe" not in dovecot


def test_smtp_logins_go_to_the_backends_imap_and_nowhere_after_it() -> None:
    dovecot = rendered(gateway_config())["dovecot/dovecot.conf"]
    imapc, local = top_level_passdbs(dovecot)
    assert "driver = imap" in imapc
    assert "args = host=192.0.2.10 port=143 ssl=starttls ssl_ca_file=/etc/postwarden/" in imapc
    # A wrong password is an internal failure in 2.3: `continue` would try the next passdb.
    assert "result_failure = return-fail" in imapc
    assert "result_internalfail = return-fail" in imapc
    assert "username_filter = *@corp.test *@corp2.test" in imapc
    # The local users file never answers for the backend's domains.
    assert "driver = passwd-file" in local
    assert "username_filter = !*@corp.test !*@corp2.test" in local


def test_unencrypted_leaves_every_ssl_field_out() -> None:
    plain = {"host": "192.0.2.10", "security": "none"}
    config = gateway_config(smtp=plain, imap=plain, pop3=plain, ca=None)
    files = rendered(config)
    dovecot = files["dovecot/dovecot.conf"]
    # Dovecot reads any ssl= (ssl=no too) as TLS on; unencrypted means no field at all.
    assert "ssl=" not in "".join(blocks(dovecot, "passdb"))
    assert "starttls=" not in dovecot
    assert "ssl_ca =" not in dovecot
    service = master_services(files["postfix/master.cf"])["gateway_backend"]
    assert "smtp_tls_security_level=none" in service and not any("CAfile" in o for o in service)


def test_a_pop3_the_backend_does_not_offer_is_denied() -> None:
    dovecot = rendered(gateway_config(pop3=None))["dovecot/dovecot.conf"]
    (pop3,) = [b for b in blocks(dovecot, "protocol pop3") if "passdb" in b]
    assert "deny = yes" in pop3 and "proxy=y" not in pop3


def test_without_the_backends_imap_imap_and_smtp_logins_are_denied() -> None:
    dovecot = rendered(gateway_config(imap=None))["dovecot/dovecot.conf"]
    (imap,) = [b for b in blocks(dovecot, "protocol imap") if "passdb" in b]
    smtp, _local = top_level_passdbs(dovecot)
    for passdb in (imap, smtp):
        assert "deny = yes" in passdb and "username_filter = *@corp.test" in passdb
    assert "driver = imap" not in dovecot


def test_no_credential_is_cached_logged_or_trusted() -> None:
    dovecot = rendered(gateway_config())["dovecot/dovecot.conf"]
    for line in (
        "auth_cache_size = 0",
        "auth_verbose_passwords = no",
        "auth_debug_passwords = no",
        "login_trusted_networks =",
        "ssl_ca = </etc/postwarden/backend-ca.pem",
        "ssl_require_crl = no",
    ):
        assert re.search(rf"^{re.escape(line)}$", dovecot, re.M), line
    for forbidden in ("rawlog", "auth_policy_server_url", "auth_debug = yes"):
        assert forbidden not in dovecot
    files = rendered(gateway_config())
    assert "debug_peer_list" not in files["postfix/main.cf"]
    assert "smtpd_tls_loglevel = 1" in files["postfix/main.cf"]
    # Transcripts (with the AUTH line) are mailed on errors unless notify_classes is empty.
    services = master_services(files["postfix/master.cf"])
    assert "notify_classes=" in services["587"] and "notify_classes=" in services["465"]


def test_backend_domains_and_their_users_mail_are_relayed_to_the_backend_verified() -> None:
    files = rendered(gateway_config())
    target = "gateway_backend:[192.0.2.10]:587"
    assert f"corp.test {target}\n" in files["postfix/transport"]
    assert f"@corp2.test {target}\n" in files["postfix/sender_relays"]
    main = files["postfix/main.cf"]
    assert re.search(r"^relay_domains = corp\.test corp2\.test$", main, re.M)
    assert "virtual_mailbox_domains = example.test\n" in main  # never delivered here
    service = master_services(files["postfix/master.cf"])["gateway_backend"]
    for opt in (
        "smtp_tls_security_level=secure",
        "smtp_tls_wrappermode=no",
        "smtp_tls_secure_cert_match=backend.test",
        "smtp_tls_CAfile=/etc/postwarden/backend-ca.pem",
    ):
        assert opt in service, opt
    # Port 25 from outside with a backend domain's sender is a forgery, as for ours.
    assert "corp\\.test$/ 550 5.7.1" in files["postfix/local_sender_domains"]


def test_tls_to_the_backend_smtp_is_wrapper_mode_with_the_client_certificate() -> None:
    config = gateway_config(
        smtp={"host": "backend.test", "security": "tls"},
        client_cert="/etc/postwarden/gw.crt",
        client_key="/etc/postwarden/gw.key",
    )
    service = master_services(rendered(config)["postfix/master.cf"])["gateway_backend"]
    assert "smtp_tls_wrappermode=yes" in service
    assert "smtp_tls_cert_file=/etc/postwarden/gw.crt" in service
    assert "smtp_tls_key_file=/etc/postwarden/gw.key" in service
    assert "gateway_backend:[backend.test]:465" in rendered(config)["postfix/transport"]


def test_without_gateway_mode_nothing_of_it_is_rendered() -> None:
    files = rendered(parse_config({"mail": MAIL}))
    assert "gateway_backend" not in files["postfix/master.cf"]
    assert "username_filter" not in files["dovecot/dovecot.conf"]
    assert "driver = imap" not in files["dovecot/dovecot.conf"]


def test_the_backend_ca_and_client_certificate_must_load(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf = ca.issue_cert("gw.example.test")
    cert, key = tmp_path / "gw.crt", tmp_path / "gw.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    check_tls_files(gateway_config(ca=str(ca_file), client_cert=str(cert), client_key=str(key)))
    with pytest.raises(RenderError, match=r"gateway\.ca: cannot read .*absent"):
        check_tls_files(gateway_config(ca=str(tmp_path / "absent.pem")))
    with pytest.raises(RenderError, match=r"gateway\.ca: .* holds no PEM certificate"):
        check_tls_files(gateway_config(ca=str(key)))
    other = tmp_path / "other.key"
    ca.issue_cert("x.test").private_key_pem.write_to_path(str(other))
    with pytest.raises(RenderError, match=r"gateway\.client_key: .* is not the key of"):
        check_tls_files(
            gateway_config(ca=str(ca_file), client_cert=str(cert), client_key=str(other))
        )
