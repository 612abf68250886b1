"""Who may use a sender address, through the real private Postfix + Dovecot.

On the AUTH ports (587, 465) a login may send only as an address it owns: its own,
what mail.sender_grants gives it, and the forwarding aliases that deliver to it (policyd's
socketmap). On port 25 an outside client that has not logged in may not use a sender in
one of our own mail domains (mail.reject_forged_local_senders).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.gateway import PolicydGateway
from tests.fixtures.mail_system import MailSystem, MailSystemFactory, SmtpResult
from tests.fixtures.policyd_daemon import start_policyd

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
AUTH_PORTS = ("submission_port", "smtps_port")
GRANTS = {"sender_grants": {ALICE: ["sales@example.test", "@partner.example"]}}


def _send_as(mail: MailSystem, port_key: str, sender: str, login: str = ALICE) -> SmtpResult:
    password = {ALICE: ALICE_PW, BOB: BOB_PW}[login.lower()]
    return mail.smtp_send(
        sender,
        "friend@elsewhere.test",
        port_key=port_key,
        starttls=port_key == "submission_port",
        login=(login, password),
    )


def _refused_as_not_owned(result: SmtpResult, login: str = ALICE) -> bool:
    # smtpd_delay_reject: the sender check answers at the first RCPT.
    return (result.stage, result.code) == (
        "rcpt",
        553,
    ) and f"not owned by user {login}" in result.text


@pytest.mark.parametrize("port_key", AUTH_PORTS)
def test_logged_in_user_sends_only_as_own_and_granted_addresses(
    mail_system_factory: MailSystemFactory, port_key: str
) -> None:
    mail = mail_system_factory({"mail": GRANTS})
    for forged in (BOB, "ceo@bigbank.example", "bob@partner.example.net"):
        result = _send_as(mail, port_key, forged)
        assert _refused_as_not_owned(result), (forged, result)
    # Case does not matter, in the address or in the login.
    for own in (ALICE, "Alice@Example.TEST", "sales@example.test", "anyone@Partner.example"):
        result = _send_as(mail, port_key, own)
        assert result.accepted, (own, result)
    assert _send_as(mail, port_key, ALICE, login="ALICE@example.test").accepted
    # A grant is the granted login's only: bob has none of alice's.
    assert _refused_as_not_owned(_send_as(mail, port_key, "sales@example.test", BOB), BOB)
    assert _refused_as_not_owned(_send_as(mail, port_key, "x@partner.example", BOB), BOB)


@pytest.fixture
def gateway_with_aliases(mail_system_factory: MailSystemFactory) -> Iterator[PolicydGateway]:
    """A private Postfix + Dovecot whose aliases (and alias owners) come from a real policyd."""
    directory = Path(tempfile.mkdtemp(prefix="pw-senders-"))
    directory.chmod(0o755)  # Postfix's daemons run as postfix and must reach the socket
    aliases_socket = directory / "aliases.sock"
    policyd = start_policyd(
        directory,
        {
            "policyd": {
                "socket_mode": "0660",
                "socket_group": "postfix",
                "aliases_listen": f"unix:{aliases_socket}",
            },
            "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
        },
        tcp=False,
    )
    mail: MailSystem | None = None
    try:
        assert policyd.socket_path is not None
        mail = mail_system_factory(
            policyd_socket=str(policyd.socket_path), aliases_socket=str(aliases_socket)
        )
        yield PolicydGateway(mail, policyd)
    finally:
        if mail is not None:
            mail.stop()
        policyd.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def test_alias_targets_may_send_as_the_alias(gateway_with_aliases: PolicydGateway) -> None:
    gateway = gateway_with_aliases
    gateway.cli("aliases", "add", "sales", "alice", "carol@elsewhere.test")
    for port_key in AUTH_PORTS:
        assert _send_as(gateway.mail, port_key, "sales@example.test").accepted
        # bob is no target of sales@, and the alias gives alice nothing else.
        refused = _send_as(gateway.mail, port_key, "sales@example.test", BOB)
        assert _refused_as_not_owned(refused, BOB), refused
        assert _refused_as_not_owned(_send_as(gateway.mail, port_key, BOB)), port_key
    # Removed, the alias no longer makes alice an owner: asked live, no reload.
    gateway.cli("aliases", "remove", "sales")
    assert _refused_as_not_owned(_send_as(gateway.mail, "submission_port", "sales@example.test"))


def test_outside_client_may_not_use_a_sender_in_our_domains_on_port_25(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory(
        {"mail": {"additional_domains": ["example.org"]}, "network": {"trusted": ["192.0.2.0/24"]}}
    )
    for forged in (BOB, "ceo@Example.ORG"):
        result = mail.smtp_send(forged, ALICE, client_ip="198.51.100.20")
        assert (result.stage, result.code) == ("rcpt", 550), (forged, result)
        assert "Sender address in our own domain" in result.text, result
    # Subdomains are not ours, other senders are not ours, and a trusted network may.
    assert mail.smtp_send("x@sub.example.test", ALICE, client_ip="198.51.100.20").accepted
    assert mail.smtp_send("friend@remote.test", ALICE, client_ip="198.51.100.20").accepted
    assert mail.smtp_send(BOB, ALICE, client_ip="192.0.2.25").accepted


def test_forged_local_senders_may_be_allowed(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory({"mail": {"reject_forged_local_senders": False}})
    assert mail.smtp_send(BOB, ALICE, client_ip="198.51.100.20").accepted
