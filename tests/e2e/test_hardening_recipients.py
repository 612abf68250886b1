"""Nothing is accepted that cannot be delivered, through the real private Postfix + Dovecot.

SMTPUTF8 (which Dovecot 2.3's LMTP cannot carry) is refused at MAIL instead of bounced after
250; address-literal recipients are refused; postmaster@ and abuse@ exist in every mail
domain; and with policyd's live `mailboxes` map a deleted user is refused at the next RCPT.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.gateway import PolicydGateway
from tests.fixtures.mail_system import MailSystem, MailSystemFactory
from tests.fixtures.policyd_daemon import PolicydHandle, start_policyd

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
OUTSIDE = "198.51.100.30"


def test_smtputf8_is_refused_at_mail_not_bounced_later(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory()
    with mail.raw_smtp(client_ip=OUTSIDE) as session:
        code, features = session.command("EHLO mail.remote.test")
        assert code == 250 and "SMTPUTF8" not in features.upper(), features
        code, text = session.command("MAIL FROM:<jörg@remote.test> SMTPUTF8".encode())
        assert (code, text) == (555, "5.5.4 Unsupported option: SMTPUTF8"), (code, text)
        # Without the keyword, an 8-bit sender is what Postfix and Dovecot have always
        # carried: accepted and delivered, not bounced.
        assert session.command("MAIL FROM:<jörg@remote.test>".encode())[0] == 250
        # An 8-bit recipient in our domains names no mailbox: refused at RCPT.
        assert session.command("RCPT TO:<jörg@example.test>".encode())[0] == 550
        assert session.command(f"RCPT TO:<{ALICE}>")[0] == 250
        assert session.command("DATA")[0] == 354
        code, text = session.command(b"Subject: 8-bit sender\r\n\r\nhello\r\n.")
        assert code == 250, text
    (message,) = mail.wait_for_delivery(ALICE, ALICE_PW)
    assert message["Subject"] == "8-bit sender"
    assert "status=bounced" not in mail.postfix_log, mail.postfix_log


@pytest.mark.parametrize("client", ["outside", "trusted", "logged-in"])
def test_address_literal_recipients_are_refused(
    mail_system_factory: MailSystemFactory, client: str
) -> None:
    mail = mail_system_factory()
    # The gateway's own address; for clients that may relay, another host's too (from
    # outside that is a relay attempt, refused as such before the recipient check).
    literals = ["anything@[127.0.0.1]", "postmaster@[127.0.0.1]"]
    if client != "outside":
        literals += ["x@[192.0.2.1]", "x@[IPv6:2001:db8::1]"]
    for literal in literals:
        if client == "logged-in":
            result = mail.smtp_send(
                ALICE, literal, port_key="submission_port", starttls=True, login=(ALICE, ALICE_PW)
            )
        else:
            result = mail.smtp_send(
                "a@remote.test", literal, client_ip=OUTSIDE if client == "outside" else None
            )
        assert (result.stage, result.code) == ("rcpt", 550), (literal, result)
        assert "Address literals" in result.text, result
    assert mail.queue() == []


def test_postmaster_and_abuse_exist_in_every_mail_domain(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory(
        {"mail": {"additional_domains": ["example.org"], "postmaster_address": ALICE}}
    )
    recipients = [
        f"{user}@{domain}"
        for user in ("postmaster", "abuse")
        for domain in ("example.test", "example.org")
    ]
    for recipient in recipients:
        sent = mail.smtp_send("a@remote.test", recipient, subject=recipient, client_ip=OUTSIDE)
        assert sent.accepted, (recipient, sent)
    messages = mail.wait_for_delivery(ALICE, ALICE_PW, count=len(recipients))
    assert sorted(str(m["Subject"]) for m in messages) == sorted(recipients)


@dataclass
class LiveMailboxes:
    mail: MailSystem
    policyd: PolicydHandle


@pytest.fixture
def live_mailboxes(mail_system_factory: MailSystemFactory) -> Iterator[LiveMailboxes]:
    """Postfix asking a real policyd's `mailboxes` socketmap, which asks Dovecot over LMTP."""
    directory = Path(tempfile.mkdtemp(prefix="pw-mailboxes-"))
    directory.chmod(0o755)  # Postfix's daemons run as postfix and must reach the socket
    maps_socket = directory / "maps.sock"
    probe_socket = directory / "dovecot-probe.sock"
    policyd = start_policyd(
        directory,
        {
            "policyd": {
                "socket_mode": "0660",
                "socket_group": "postfix",
                "aliases_listen": f"unix:{maps_socket}",
                "mailbox_lmtp": f"unix:{probe_socket}",
            },
            "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
        },
        tcp=False,
    )
    mail: MailSystem | None = None
    try:
        # Dovecot opens the probe socket (render_dovecot's second LMTP listener).
        mail = mail_system_factory(
            {"policyd": {"mailbox_lmtp": f"unix:{probe_socket}"}},
            aliases_socket=str(maps_socket),
            mailboxes_socket=str(maps_socket),
        )
        yield LiveMailboxes(mail, policyd)
    finally:
        if mail is not None:
            mail.stop()
        policyd.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def test_deleted_user_is_refused_at_rcpt_at_once(live_mailboxes: LiveMailboxes) -> None:
    mail = live_mailboxes.mail
    assert mail.smtp_send("a@remote.test", BOB, subject="before", client_ip=OUTSIDE).accepted
    mail.wait_for_delivery(BOB, BOB_PW)
    unknown = mail.smtp_send("a@remote.test", "nobody@example.test", client_ip=OUTSIDE)
    assert (unknown.stage, unknown.code) == ("rcpt", 550), unknown
    # bob leaves: his line goes from the users file. Dovecot looks at the file at most once
    # a second, so a second later the next RCPT is refused, with nothing cached in between.
    users = mail.layout.users_file
    users.write_text(
        "".join(line for line in users.read_text().splitlines(True) if BOB not in line)
    )
    time.sleep(1.1)
    gone = mail.smtp_send("a@remote.test", BOB, client_ip=OUTSIDE)
    assert (gone.stage, gone.code) == ("rcpt", 550), (gone, mail.postfix_log)
    # No verify probe (and so no cache) was involved.
    assert "verify" not in mail.postfix_log.replace("verify_cache", ""), mail.postfix_log
    assert mail.smtp_send("a@remote.test", ALICE, client_ip=OUTSIDE).accepted


def test_an_alias_whose_mailbox_was_deleted_is_refused_at_rcpt(
    live_mailboxes: LiveMailboxes,
) -> None:
    mail = live_mailboxes.mail
    PolicydGateway(mail, live_mailboxes.policyd).cli("aliases", "add", "sales", BOB)
    assert mail.smtp_send("a@remote.test", "sales@example.test", client_ip=OUTSIDE).accepted
    mail.wait_for_delivery(BOB, BOB_PW)
    users = mail.layout.users_file
    users.write_text(
        "".join(line for line in users.read_text().splitlines(True) if BOB not in line)
    )
    time.sleep(1.1)  # Dovecot looks at the users file at most once a second
    # The alias now leads nowhere: refused at RCPT, not accepted and bounced at delivery.
    gone = mail.smtp_send("a@remote.test", "sales@example.test", client_ip=OUTSIDE)
    assert (gone.stage, gone.code) == ("rcpt", 550), (gone, mail.postfix_log)
