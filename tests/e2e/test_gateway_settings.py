"""More [mail] settings as clients see them: listen interfaces and IPv6, the per-client
connection limit, trash retention, additional domains, trusted networks, copies of outgoing
mail and the outbound relay's transport (SMTPS, STARTTLS off/on).

Each test renders a private Postfix + Dovecot from the setting; a second private instance
stands for the provider's smarthost where mail must leave.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import trustme

from tests.fixtures import netns
from tests.fixtures.gateway import submit_authenticated
from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
DAVE, DAVE_PW = "dave@outside.test", "outside-secret"
FAKETIME = shutil.which("faketime") or "faketime"
IMAP_BINARY = "/usr/lib/dovecot/imap"


def _smarthost(factory: MailSystemFactory) -> MailSystem:
    """A second real Postfix + Dovecot: the provider's relay, holding dave's mailbox."""
    # A provider lets its customer's login send as the customer's own domain (postwarden
    # binds a login to the senders it owns on 587/465).
    return factory(
        {
            "mail": {
                "hostname": "smtp.outside.test",
                "main_domain": "outside.test",
                "sender_grants": {DAVE: ["@example.test"]},
            }
        },
        users={DAVE: DAVE_PW},
    )


# --- listening -------------------------------------------------------------------------------


# Each runs in a private network namespace (tests/fixtures/netns.py): "all" binds the
# wildcard address, which there reaches only the namespace's loopback and its one other
# interface (netns.OTHER_IPV4 / OTHER_IPV6), never the machine's own interfaces.
MAIL_PORTS = ("smtp_port", "submission_port", "imap_port", "pop3_port")


def _listening(
    factory: MailSystemFactory, namespace: str, listen: str, ipv6: bool
) -> tuple[dict[str, set[str]], str]:
    """Start an instance with mail.listen/mail.ipv6: per port, the addresses that answer,
    and Postfix's greeting over the ::1 (ipv6) or 127.0.0.1 loopback."""
    mail = factory(
        {"mail": {"listen": listen, "ipv6": ipv6}},
        listen_from_config=True,
        network_namespace=namespace,
    )
    addresses = ("127.0.0.1", "127.0.0.2", "::1", netns.OTHER_IPV4, netns.OTHER_IPV6)
    answering = {
        key: {a for a in addresses if netns.connects(namespace, a, mail.ports[key])}
        for key in MAIL_PORTS
    }
    loopback = "::1" if ipv6 else "127.0.0.1"
    greeting = netns.greeting(namespace, loopback, mail.ports["smtp_port"]).decode()
    return answering, greeting


def test_loopback_with_ipv6_listens_on_127_0_0_1_and_the_ipv6_loopback_only(
    mail_system_factory: MailSystemFactory, network_namespace: str
) -> None:
    found, greeting = _listening(mail_system_factory, network_namespace, "loopback", ipv6=True)
    # Loopback means the loopback addresses: not the rest of 127/8, not another interface.
    for key in MAIL_PORTS:
        assert found[key] == {"127.0.0.1", "::1"}, key
    assert greeting.startswith("220 mx.example.test ESMTP"), greeting


def test_ipv6_off_does_not_listen_on_the_ipv6_loopback(
    mail_system_factory: MailSystemFactory, network_namespace: str
) -> None:
    found, _ = _listening(mail_system_factory, network_namespace, "loopback", ipv6=False)
    for key in MAIL_PORTS:
        assert found[key] == {"127.0.0.1"}, key


def test_listen_all_without_ipv6_accepts_on_every_ipv4_address_only(
    mail_system_factory: MailSystemFactory, network_namespace: str
) -> None:
    found, _ = _listening(mail_system_factory, network_namespace, "all", ipv6=False)
    for key in MAIL_PORTS:
        assert found[key] == {"127.0.0.1", "127.0.0.2", netns.OTHER_IPV4}, key


def test_listen_all_with_ipv6_accepts_on_every_address_of_both_families(
    mail_system_factory: MailSystemFactory, network_namespace: str
) -> None:
    found, greeting = _listening(mail_system_factory, network_namespace, "all", ipv6=True)
    everything = {"127.0.0.1", "127.0.0.2", "::1", netns.OTHER_IPV4, netns.OTHER_IPV6}
    for key in MAIL_PORTS:
        assert found[key] == everything, key
    assert greeting.startswith("220 mx.example.test ESMTP"), greeting


# --- connection limit ------------------------------------------------------------------------


def test_one_client_beyond_max_connections_per_client_gets_a_4xx(
    mail_system_factory: MailSystemFactory,
) -> None:
    # Postfix's anvil counts real TCP peers (XCLIENT comes too late), and trusted networks
    # are exempt, so the client is 127.0.0.2 with only 127.0.0.1 trusted.
    mail = mail_system_factory(
        {"mail": {"max_connections_per_client": 2}, "network": {"trusted": ["127.0.0.1/32"]}}
    )
    port = mail.ports["smtp_port"]
    source = ("127.0.0.2", 0)
    open_sessions = [smtplib.SMTP(HOST, port, timeout=10, source_address=source) for _ in range(2)]
    try:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP(HOST, port, timeout=10, source_address=source)
        assert refused.value.smtp_code == 421, refused.value
        assert b"too many connections from 127.0.0.2" in refused.value.smtp_error
        # Another client is not affected by 127.0.0.2's sessions.
        with smtplib.SMTP(HOST, port, timeout=10, source_address=("127.0.0.3", 0)) as other:
            assert other.noop()[0] == 250
    finally:
        for session in open_sessions:
            session.close()
    # Once its sessions end, the client may connect again (anvil is told at disconnect).
    deadline = time.monotonic() + 15
    while True:
        try:
            with smtplib.SMTP(HOST, port, timeout=10, source_address=source) as again:
                assert again.noop()[0] == 250
            break
        except smtplib.SMTPConnectError:
            assert time.monotonic() < deadline, mail.postfix_log
            time.sleep(0.2)


# --- trash retention -------------------------------------------------------------------------


def _trash_count(mail: MailSystem, user: str, password: str) -> int:
    conn = imaplib.IMAP4(HOST, mail.ports["imap_port"], timeout=10)
    conn.starttls(ssl_context=mail.client_tls_context())
    try:
        conn.login(user, password)
        _, data = conn.select("Trash", readonly=True)
        return int(data[0] or b"0")
    finally:
        conn.logout()


def _imap_session_days_later(mail: MailSystem, user: str, days: int) -> None:
    """An IMAP session of `user`'s `days` in the future (libfaketime on a preauth imap
    process). Dovecot autoexpunges at logout, judging each message by its save date."""
    conf = str(mail.layout.dovecot_dir / "dovecot.conf")
    # imap re-executes itself through doveconf with a cleaned environment; these two must
    # survive that or the clock is the real one again.
    env = {**os.environ, "DOVECOT_PRESERVE_ENVS": "LD_PRELOAD FAKETIME"}
    done = subprocess.run(
        [FAKETIME, "-f", f"+{days}d", IMAP_BINARY, "-c", conf, "-u", user],
        input=b"a LOGOUT\r\n",
        capture_output=True,
        env=env,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0 and b"a OK" in done.stdout, (done.stdout, done.stderr)


def test_trash_older_than_the_retention_is_expunged(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory({"mail": {"trash_retention_days": 30}})
    for user, password in ((ALICE, ALICE_PW), (BOB, BOB_PW)):
        conn = imaplib.IMAP4(HOST, mail.ports["imap_port"], timeout=10)
        conn.starttls(ssl_context=mail.client_tls_context())
        try:
            conn.login(user, password)
            for subject in ("deleted", "deleted too"):
                message = f"From: <a@remote.test>\r\nSubject: {subject}\r\n\r\nbye\r\n"
                typ, _ = conn.append("Trash", None, None, message.encode())
                assert typ == "OK"
            keep = b"From: <a@remote.test>\r\nSubject: keep\r\n\r\nhi\r\n"
            assert conn.append("INBOX", None, None, keep)[0] == "OK"
            # Autoexpunge judges by the save date. Fetched now, Dovecot caches it in its index;
            # left to its maildir fallback, one of two messages survived the +31 d session here.
            conn.select("Trash")
            _, dates = conn.fetch("1:*", "(SAVEDATE)")
            assert len(dates) == 2 and all("SAVEDATE" in str(d) for d in dates), dates
        finally:
            conn.logout()
        assert _trash_count(mail, user, password) == 2
    # One user per clock: a session seen at one faked time leaves index state behind.
    _imap_session_days_later(mail, ALICE, 29)  # within the retention: kept
    assert _trash_count(mail, ALICE, ALICE_PW) == 2
    _imap_session_days_later(mail, BOB, 31)  # past it: gone from Trash, and only from Trash
    assert _trash_count(mail, BOB, BOB_PW) == 0, mail.dovecot_log
    (kept,) = mail.imap_fetch(BOB, BOB_PW)
    assert kept["Subject"] == "keep"


# --- domains, trusted networks, copies -------------------------------------------------------


def test_additional_domain_delivers_to_its_mailboxes(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory(
        {"mail": {"additional_domains": ["example.org"]}},
        users={ALICE: ALICE_PW, "carol@example.org": "carol-secret"},
    )
    sent = mail.smtp_send("a@remote.test", "carol@example.org", client_ip="192.0.2.1")
    assert sent.accepted, sent
    (message,) = mail.wait_for_delivery("carol@example.org", "carol-secret")
    assert "carol@example.org" in str(message["To"])
    # The additional domain's unknown mailboxes are refused like the main domain's.
    unknown = mail.smtp_send("a@remote.test", "nobody@example.org", client_ip="192.0.2.1")
    assert (unknown.stage, unknown.code) == ("rcpt", 550), unknown


def test_trusted_network_relays_without_login(mail_system_factory: MailSystemFactory) -> None:
    smarthost = _smarthost(mail_system_factory)
    relay = {"name": "isp", "host": HOST, "port": smarthost.ports["smtp_port"]}
    mail = mail_system_factory(
        {
            "mail": {"relays": [relay]},
            "network": {"trusted": ["127.0.0.0/8", "192.0.2.0/24"]},
        }
    )
    sent = mail.smtp_send("printer@example.test", DAVE, client_ip="192.0.2.50", subject="scan")
    assert sent.accepted, sent
    (message,) = smarthost.wait_for_delivery(DAVE, DAVE_PW)
    assert message["Subject"] == "scan"
    # A client outside the trusted networks may not relay.
    refused = mail.smtp_send("printer@example.test", DAVE, client_ip="203.0.113.50")
    assert (refused.stage, refused.code) == ("rcpt", 554), refused


def test_copy_of_all_outgoing_mail(mail_system_factory: MailSystemFactory) -> None:
    smarthost = _smarthost(mail_system_factory)
    relay = {"name": "isp", "host": HOST, "port": smarthost.ports["smtp_port"]}
    mail = mail_system_factory({"mail": {"relays": [relay], "copy_outgoing_to": BOB}})
    submit_authenticated(mail, (ALICE, ALICE_PW), DAVE, "outgoing")
    (sent,) = smarthost.wait_for_delivery(DAVE, DAVE_PW)
    (copy,) = mail.wait_for_delivery(BOB, BOB_PW)
    assert sent["Subject"] == copy["Subject"] == "outgoing"
    # Incoming mail (from another domain) is not copied.
    assert mail.smtp_send("a@remote.test", ALICE, client_ip="192.0.2.1", subject="in").accepted
    mail.wait_for_delivery(ALICE, ALICE_PW)
    assert [m["Subject"] for m in mail.imap_fetch(BOB, BOB_PW)] == ["outgoing"]


# --- the outbound relay's transport ----------------------------------------------------------


def test_smtps_relay_with_credentials(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    smarthost = _smarthost(mail_system_factory)
    password = tmp_path / "relay.pw"
    password.write_text(DAVE_PW + "\n")
    relay = {
        "name": "isp",
        "protocol": "smtps",
        "host": HOST,
        "port": smarthost.ports["smtps_port"],  # TLS from the first byte, login required
        "username": DAVE,
        "password_file": str(password),
        "timeout": 10,
    }
    mail = mail_system_factory({"mail": {"relays": [relay]}})
    submit_authenticated(mail, (ALICE, ALICE_PW), DAVE, "over smtps")
    (message,) = smarthost.wait_for_delivery(DAVE, DAVE_PW)
    assert message["Subject"] == "over smtps"
    log = smarthost.postfix_log
    assert "postfix/smtps/smtpd" in log and f"sasl_username={DAVE}" in log, log
    assert "TLS connection established from localhost[127.0.0.1]" in log, log


@pytest.mark.parametrize("starttls", ["disabled", "enabled"])
def test_starttls_towards_the_relay_follows_the_setting(
    mail_system_factory: MailSystemFactory, starttls: str
) -> None:
    smarthost = _smarthost(mail_system_factory)  # offers STARTTLS
    relay = {"name": "isp", "host": HOST, "port": smarthost.ports["smtp_port"]}
    mail = mail_system_factory({"mail": {"relays": [{**relay, "starttls": starttls}]}})
    submit_authenticated(mail, (ALICE, ALICE_PW), DAVE, f"starttls {starttls}")
    smarthost.wait_for_delivery(DAVE, DAVE_PW)
    used_tls = "TLS connection established from localhost[127.0.0.1]" in smarthost.postfix_log
    assert used_tls == (starttls == "enabled"), smarthost.postfix_log


# --- the operator's own certificate ----------------------------------------------------------


def test_configured_certificate_is_served_on_smtp_imap_and_pop3(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    # The operator's CA, unknown to the fixture: a client trusting only it can connect, so the
    # certificate presented is the configured one, not the install-time self-signed pair.
    operator_ca = trustme.CA()
    # Named for mail.hostname (config apply insists) and the address the tests dial.
    issued = operator_ca.issue_cert("mx.example.test", HOST)
    cert, key = tmp_path / "mx.crt", tmp_path / "mx.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    mail = mail_system_factory({"mail": {"tls": {"cert": str(cert), "key": str(key)}}})
    ctx = ssl.create_default_context()
    operator_ca.configure_trust(ctx)
    with smtplib.SMTP(HOST, mail.ports["smtp_port"], timeout=10) as client:
        client.ehlo("client.test")
        code, _ = client.starttls(context=ctx)
        assert code == 220
    with imaplib.IMAP4_SSL(HOST, mail.ports["imaps_port"], ssl_context=ctx, timeout=10) as imap:
        imap.login(ALICE, ALICE_PW)
    pop = poplib.POP3_SSL(HOST, mail.ports["pop3s_port"], context=ctx, timeout=10)
    try:
        pop.user(ALICE)
        pop.pass_(ALICE_PW)
    finally:
        pop.quit()
    # The fixture's own CA (the self-signed pair's) is not what is served any more.
    with (
        smtplib.SMTP(HOST, mail.ports["smtp_port"], timeout=10) as client,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        client.ehlo("client.test")
        client.starttls(context=mail.client_tls_context())
