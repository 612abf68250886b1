"""Smaller SMTP protocol hardening, through the real private Postfix + Dovecot.

VRFY is off; outside clients must say a valid fully qualified HELO name; DSN is not
offered on port 25 (no success notices to forged senders) but is on submission; a message
holding a NUL byte is refused.
"""

from __future__ import annotations

import pytest

from tests.fixtures.mail_system import MailSystemFactory

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
OUTSIDE = "198.51.100.50"


def test_vrfy_is_disabled(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory()
    with mail.raw_smtp(client_ip=OUTSIDE) as session:
        code, text = session.command(f"VRFY {ALICE}")
    assert (code, text) == (502, "5.5.1 VRFY command is disabled"), (code, text)


@pytest.mark.parametrize(
    ("helo", "code"),
    [("localhost", 504), ("mailhost", 504), ("bad_name!.example", 501), ("[192.0.2.1", 501)],
)
def test_outside_client_needs_a_valid_fully_qualified_helo(
    mail_system_factory: MailSystemFactory, helo: str, code: int
) -> None:
    mail = mail_system_factory()
    with mail.raw_smtp(client_ip=OUTSIDE) as session:
        reply = session.command(f"EHLO {helo}")
        assert reply[0] == code and "Helo command rejected" in reply[1], reply
    # A trusted network (loopback here) may call itself what it likes.
    with mail.raw_smtp(helo=helo) as session:  # fails unless EHLO is answered 250
        assert session.command("MAIL FROM:<a@remote.test>")[0] == 250
    assert mail.smtp_send("a@remote.test", ALICE, client_ip=OUTSIDE).accepted


def test_dsn_is_not_offered_on_port_25_but_on_submission(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory()
    with mail.raw_smtp(client_ip=OUTSIDE) as session:
        code, features = session.command("EHLO mail.remote.test")
        assert code == 250 and "DSN" not in features.split("\n"), features
        assert session.command("MAIL FROM:<victim@remote.test>")[0] == 250
        # An outsider asking for a success notice anyway (for a sender it forged) is refused.
        code, text = session.command(f"RCPT TO:<{ALICE}> NOTIFY=SUCCESS")
        assert (code, text) == (501, "5.7.1 DSN support is disabled"), (code, text)
    with mail.raw_smtp(port_key="submission_port", starttls=True) as session:
        code, features = session.command("EHLO client.test")
        assert code == 250 and "DSN" in features.split("\n"), features


def test_message_with_a_nul_byte_is_refused(mail_system_factory: MailSystemFactory) -> None:
    mail = mail_system_factory()
    message = b"From: <a@remote.test>\r\nSubject: nul\r\n\r\nbefore\x00after\r\n"
    result = mail.smtp_send("a@remote.test", ALICE, message=message, client_ip=OUTSIDE)
    assert (result.stage, result.code) == ("data", 550), result
    assert mail.queue() == []
