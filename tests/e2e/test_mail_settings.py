"""[mail] settings as a client sees them, through a private Postfix + Dovecot rendered from them."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import time
from pathlib import Path

import pytest

from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory, free_port

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"


def test_connection_control_refuses_listed_clients_at_connect(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory(
        {"mail": {"connection_control": {"addresses": ["198.51.100.*", "2001:db8::/32"]}}}
    )
    refused = mail.smtp_send("a@remote.test", ALICE, client_ip="198.51.100.9")
    # XCLIENT restarts the session: its reply is the greeting the posed client would get.
    assert (refused.stage, refused.code) == ("xclient", 554), refused
    assert "Connection refused by policy" in refused.text
    assert mail.smtp_send("a@remote.test", ALICE, client_ip="198.51.101.9").accepted


def test_connection_control_file_in_the_seed_format_refuses_listed_clients(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    listed = tmp_path / "ips.txt"
    # The seed's "Import from file" format: addresses, addr:mask, IPv6, plus a wildcard.
    listed.write_text(
        "192.168.1.1\n192.168.2.0:255.255.255.0\n2001:db8::/32\n203.0.113.*\n",
        encoding="utf-8",
    )
    # ipv6 = true: Postfix takes IPv6 client addresses (XCLIENT included) only then.
    mail = mail_system_factory(
        {"mail": {"ipv6": True, "connection_control": {"addresses_file": str(listed)}}}
    )
    # XCLIENT names an IPv6 client as IPV6:addr.
    for client in ("192.168.2.200", "203.0.113.5", "192.168.1.1", "IPV6:2001:db8:1::7"):
        refused = mail.smtp_send("a@remote.test", ALICE, client_ip=client)
        assert (refused.stage, refused.code) == ("xclient", 554), (client, refused)
        assert "Connection refused by policy" in refused.text
    for client in ("192.168.3.1", "IPV6:2001:db9::7"):
        assert mail.smtp_send("a@remote.test", ALICE, client_ip=client).accepted, client


def test_unknown_local_mailbox_is_refused_at_rcpt(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory()
    result = mail.smtp_send("a@remote.test", "nobody@example.test", client_ip="192.0.2.1")
    assert (result.stage, result.code) == ("rcpt", 550), result
    assert mail.smtp_send("a@remote.test", ALICE, client_ip="192.0.2.1").accepted


def test_unknown_local_mailbox_is_refused_for_trusted_and_logged_in_clients(
    mail_system_factory: MailSystemFactory,
) -> None:
    # No XCLIENT: the client is 127.0.0.1, inside network.trusted (permit_mynetworks).
    mail = mail_system_factory()
    trusted = mail.smtp_send("ops@example.test", "nobody@example.test")
    assert (trusted.stage, trusted.code) == ("rcpt", 550), trusted
    assert "no such mailbox" in trusted.text
    logged_in = mail.smtp_send(
        ALICE,
        "nobody@example.test",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert (logged_in.stage, logged_in.code) == ("rcpt", 550), logged_in
    # Known mailboxes still pass for both, and nothing was queued to bounce.
    assert mail.smtp_send("ops@example.test", ALICE).accepted
    assert mail.smtp_send(
        ALICE,
        "bob@example.test",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    ).accepted
    mail.wait_for_delivery(ALICE, ALICE_PW)
    mail.wait_for_delivery("bob@example.test", "bob-secret")
    assert "nobody@example.test" not in " ".join(str(m) for m in mail.queue())


def test_deny_all_except_admits_only_listed_clients(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory(
        {"mail": {"connection_control": {"mode": "deny-all-except", "addresses": ["192.0.2.0/24"]}}}
    )
    assert mail.smtp_send("a@remote.test", ALICE, client_ip="192.0.2.44").accepted
    refused = mail.smtp_send("a@remote.test", ALICE, client_ip="203.0.113.44")
    assert (refused.stage, refused.code) == ("xclient", 554), refused


def test_message_size_is_advertised_and_enforced(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory({"mail": {"message_size_limit": 200_000}})
    with smtplib.SMTP(HOST, mail.ports["smtp_port"], timeout=10) as client:
        client.ehlo("client.test")
        assert client.esmtp_features["size"] == "200000"
    big = "From: <a@remote.test>\r\nSubject: big\r\n\r\n" + ("x" * 998 + "\r\n") * 250
    result = mail.smtp_send("a@remote.test", ALICE, message=big, client_ip="192.0.2.1")
    assert (result.stage, result.code) == ("data", 552), result
    assert mail.smtp_send("a@remote.test", ALICE, client_ip="192.0.2.1").accepted


def test_idle_client_is_disconnected_after_idle_timeout(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory({"mail": {"idle_timeout": 2}})
    client = smtplib.SMTP(HOST, mail.ports["smtp_port"], timeout=10)
    try:
        client.ehlo("client.test")
        time.sleep(3)
        # Postfix says "421 4.4.2 ... timeout exceeded" and hangs up.
        try:
            code, _ = client.noop()
        except smtplib.SMTPServerDisconnected:
            code = 421
        assert code == 421
    finally:
        client.close()
    assert "timeout after EHLO" in mail.postfix_log, mail.postfix_log


def test_submission_offers_auth_only_after_starttls(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory()
    with smtplib.SMTP(HOST, mail.ports["submission_port"], timeout=10) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        code, _ = client.mail(ALICE)
        assert code == 530  # "Must issue a STARTTLS command first"
    # Logged in over STARTTLS, our user may send to any domain.
    sent = mail.smtp_send(
        ALICE,
        "friend@elsewhere.test",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert sent.accepted, sent
    # Without login, nothing is accepted on 587, even for our own users.
    anon = mail.smtp_send("x@elsewhere.test", ALICE, port_key="submission_port", starttls=True)
    assert anon.stage == "rcpt" and anon.code == 554, anon


def test_smtps_port_is_tls_from_the_first_byte(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory()
    sent = mail.smtp_send(ALICE, "bob@example.test", port_key="smtps_port", login=(ALICE, ALICE_PW))
    assert sent.accepted, sent
    (message,) = mail.wait_for_delivery("bob@example.test", "bob-secret")
    assert str(message["From"]) == ALICE


REMOTE_SOURCE = ("127.0.0.2", 0)


class _RemoteIMAP4(imaplib.IMAP4):
    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, REMOTE_SOURCE)


class _RemotePOP3(poplib.POP3):
    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, REMOTE_SOURCE)


def test_imap_and_pop3_refuse_passwords_before_tls(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory()
    assert mail.smtp_send("a@remote.test", ALICE, client_ip="192.0.2.1", subject="read me").accepted
    mail.wait_for_delivery(ALICE, ALICE_PW)
    # Dovecot treats a client whose address equals the server's as secure, so come from
    # another loopback address, as a remote client would.
    plain = _RemoteIMAP4(HOST, mail.ports["imap_port"], timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match=r"(?i)plaintext|cleartext|TLS"):
            plain.login(ALICE, ALICE_PW)
    finally:
        plain.shutdown()
    pop = _RemotePOP3(HOST, mail.ports["pop3_port"], timeout=10)
    try:
        with pytest.raises(poplib.error_proto):
            pop.user(ALICE)
            pop.pass_(ALICE_PW)
    finally:
        pop.close()
    for tls in ("starttls", "implicit"):
        (message,) = mail.imap_fetch(ALICE, ALICE_PW, tls=tls)
        assert message["Subject"] == "read me"
        (message,) = mail.pop3_fetch(ALICE, ALICE_PW, tls=tls)
        assert message["Subject"] == "read me"


def test_mailbox_quota_is_reported_over_imap(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory({"mail": {"mailbox_quota_mb": 5}})
    conn = imaplib.IMAP4(HOST, mail.ports["imap_port"], timeout=10)
    conn.starttls(ssl_context=mail.client_tls_context())
    try:
        conn.login(ALICE, ALICE_PW)
        _, data = conn.getquotaroot("INBOX")
        quota_line = b" ".join(d for d in data[1] if isinstance(d, bytes))
        assert b"STORAGE 0 5120" in quota_line, data
    finally:
        conn.logout()


def test_copy_of_all_incoming_mail(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory(
        {"mail": {"copy_incoming_to": "bob@example.test"}},
    )
    assert mail.smtp_send("a@remote.test", ALICE, client_ip="192.0.2.1", subject="copied").accepted
    (original,) = mail.wait_for_delivery(ALICE, ALICE_PW)
    (copy,) = mail.wait_for_delivery("bob@example.test", "bob-secret")
    assert original["Subject"] == copy["Subject"] == "copied"


def _inside_server(factory: MailSystemFactory, domain: str, user: str) -> MailSystem:
    """A second real Postfix + Dovecot standing for a server behind the gateway."""
    # As a relay with credentials it lets that login send as the gateway's domain
    # (postwarden binds a login to the senders it owns on 587/465).
    return factory(
        {
            "mail": {
                "hostname": f"mx.{domain}",
                "main_domain": domain,
                "sender_grants": {user: ["@example.test"]},
            }
        },
        users={user: "inside-secret"},
    )


def test_relay_domain_is_forwarded_to_the_inside_server(
    mail_system_factory: MailSystemFactory,
) -> None:
    inside = _inside_server(mail_system_factory, "inside.test", "carol@inside.test")
    gateway = mail_system_factory(
        {"mail": {"relay_domains": [f"inside.test|{HOST}:{inside.ports['smtp_port']}"]}}
    )
    sent = gateway.smtp_send("a@remote.test", "carol@inside.test", client_ip="192.0.2.1")
    assert sent.accepted, sent
    (message,) = inside.wait_for_delivery("carol@inside.test", "inside-secret")
    assert "by mx.example.test" in " ".join(message.get_all("Received", []))
    # A domain neither local nor relayed is still refused (no open relay).
    refused = gateway.smtp_send("a@remote.test", "x@other.test", client_ip="192.0.2.1")
    assert (refused.stage, refused.code) == ("rcpt", 554), refused


def test_outgoing_mail_leaves_through_the_relay_for_its_sender_domain(
    mail_system_factory: MailSystemFactory,
) -> None:
    smarthost = _inside_server(mail_system_factory, "outside.test", "dave@outside.test")
    relays = [
        # The default relay is dead: mail only arrives if the sender-domain relay was chosen.
        {"name": "default", "host": HOST, "port": free_port(), "starttls": "disabled"},
        {
            "name": "isp",
            "host": HOST,
            "port": smarthost.ports["smtp_port"],
            "starttls": "disabled",
            "sender_domains": ["example.test"],
        },
    ]
    gateway = mail_system_factory({"mail": {"relays": relays, "helo_name": "out.example.test"}})
    sent = gateway.smtp_send(
        ALICE,
        "dave@outside.test",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert sent.accepted, sent
    (message,) = smarthost.wait_for_delivery("dave@outside.test", "inside-secret")
    assert str(message["From"]) == ALICE
    # The gateway introduced itself with the configured HELO name.
    assert "from out.example.test" in " ".join(message.get_all("Received", []))
    assert "postfix/relay-isp" in gateway.postfix_log


def test_outgoing_relay_with_credentials_over_required_starttls(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    smarthost = _inside_server(mail_system_factory, "outside.test", "dave@outside.test")
    password = tmp_path / "relay.pw"
    password.write_text("inside-secret\n")
    relay = {
        "name": "isp",
        "host": HOST,
        "port": smarthost.ports["submission_port"],  # AUTH is offered on 587/465 only
        "starttls": "required",
        "username": "dave@outside.test",
        "password_file": str(password),
        "timeout": 10,
    }
    gateway = mail_system_factory({"mail": {"relays": [relay]}})
    sent = gateway.smtp_send(
        ALICE,
        "dave@outside.test",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert sent.accepted, sent
    smarthost.wait_for_delivery("dave@outside.test", "inside-secret")
    # The smarthost saw a TLS session and our relay credentials.
    log = smarthost.postfix_log
    assert "TLS connection established from localhost[127.0.0.1]" in log, log
    assert "sasl_method=PLAIN, sasl_username=dave@outside.test" in log, log
