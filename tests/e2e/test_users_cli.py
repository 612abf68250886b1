"""`postwarden users` against a real Dovecot + Postfix: what the CLI writes is who logs in.

Each test points the CLI at the private instance's users file (layout.users_file) and mail
root, as `--users-file` / `--mail-root`, and then acts as the user would: IMAP logins, mail
sent through Postfix and delivered by Dovecot's LMTP, a quota that refuses a message.
"""

from __future__ import annotations

import contextlib
import imaplib
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory

pytestmark = pytest.mark.e2e

BOB, BOB_PW = "bob@example.test", "bob-secret"
CAROL = "carol@example.test"
# Bigger than a 1 MB quota, well under Postfix's message_size_limit (25 MB).
BIG_BODY_LINES = 30_000
LOGIN_SETTLE = 5.0


def users(mail: MailSystem, config_file: Path, *args: str, stdin: str | None = None) -> str:
    """Run `postwarden users ARGS` on this instance's files; fail the test unless it worked."""
    paths = ["--users-file", str(mail.layout.users_file), "--mail-root", str(mail.layout.mail_root)]
    result = CliRunner().invoke(
        cli, ["--config", str(config_file), "users", *args, *paths], input=stdin
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "postwarden.toml"
    path.write_text(
        f'[store]\nurl = "sqlite://{tmp_path}/state.db"\n\n[mail]\nmain_domain = "example.test"\n'
    )
    return path


def can_log_in(mail: MailSystem, user: str, password: str) -> bool:
    conn = imaplib.IMAP4(HOST, mail.ports["imap_port"], timeout=10)
    try:
        conn.starttls(ssl_context=mail.client_tls_context())
        conn.login(user, password)
    except imaplib.IMAP4.error:
        # A NO, or (abort) Dovecot closing the connection: in the second after a change to
        # the users file a login may find the user in one lookup and not the next.
        return False
    else:
        return True
    finally:
        try:
            conn.logout()
        except (imaplib.IMAP4.error, OSError):
            with contextlib.suppress(OSError):
                conn.shutdown()  # closed by the server: close our end too, leak nothing


def logins_become(mail: MailSystem, user: str, password: str, *, allowed: bool) -> bool:
    """Whether Dovecot comes to answer the login as `allowed` within LOGIN_SETTLE seconds.

    Dovecot looks at the users file at most once a second (db-passwd-file.c), so a change
    holds for logins from the next second on.
    """
    deadline = time.monotonic() + LOGIN_SETTLE
    while can_log_in(mail, user, password) != allowed:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def quota_of(mail: MailSystem, user: str, password: str) -> bytes:
    conn = imaplib.IMAP4(HOST, mail.ports["imap_port"], timeout=10)
    conn.starttls(ssl_context=mail.client_tls_context())
    try:
        conn.login(user, password)
        _, data = conn.getquotaroot("INBOX")
        return b" ".join(d for d in data[1] if isinstance(d, bytes))
    finally:
        conn.logout()


def test_an_added_user_logs_in_and_receives_mail(
    mail_system_factory: MailSystemFactory, config_file: Path
) -> None:
    mail = mail_system_factory()
    assert not can_log_in(mail, CAROL, "carol-password")
    out = users(mail, config_file, "add", "carol", stdin="carol-password\n")
    assert f"mailbox {mail.layout.mail_root}/example.test/carol" in out
    assert "{ARGON2ID}$argon2id$" in mail.layout.users_file.read_text()

    assert logins_become(mail, CAROL, "carol-password", allowed=True)
    assert not can_log_in(mail, CAROL, "wrong-password")
    sent = mail.smtp_send("a@remote.test", CAROL, client_ip="192.0.2.1", subject="welcome")
    assert sent.accepted, sent
    (message,) = mail.wait_for_delivery(CAROL, "carol-password")
    assert message["Subject"] == "welcome"
    # The fixture's users, written by hand before, still log in.
    assert can_log_in(mail, BOB, BOB_PW)


def test_passwd_changes_the_password_dovecot_checks(
    mail_system_factory: MailSystemFactory, config_file: Path
) -> None:
    mail = mail_system_factory()
    users(mail, config_file, "add", CAROL, stdin="first-password\n")
    assert logins_become(mail, CAROL, "first-password", allowed=True)
    # At once: the new hash has the old one's length, and the file changes within a second.
    users(mail, config_file, "passwd", CAROL, stdin="second-password\n")
    assert logins_become(mail, CAROL, "second-password", allowed=True)
    assert not can_log_in(mail, CAROL, "first-password")


def test_a_removed_user_is_refused_and_its_mail_kept(
    mail_system_factory: MailSystemFactory, config_file: Path
) -> None:
    mail = mail_system_factory()
    users(mail, config_file, "add", CAROL, stdin="carol-password\n")
    assert mail.smtp_send("a@remote.test", CAROL, client_ip="192.0.2.1").accepted
    mail.wait_for_delivery(CAROL, "carol-password")

    out = users(mail, config_file, "remove", CAROL)
    mailbox = mail.layout.mail_root / "example.test" / "carol"
    assert out == f"removed {CAROL}; its mailbox is kept at {mailbox}\n"
    assert logins_become(mail, CAROL, "carol-password", allowed=False)
    kept = [p for d in ("cur", "new") for p in (mailbox / "Maildir" / d).iterdir()]
    assert len(kept) == 1
    assert can_log_in(mail, BOB, BOB_PW)


def test_a_per_user_quota_refuses_a_message_over_it_at_lmtp(
    mail_system_factory: MailSystemFactory, config_file: Path
) -> None:
    mail = mail_system_factory()
    users(mail, config_file, "add", CAROL, "--quota", "1", stdin="carol-password\n")
    assert logins_become(mail, CAROL, "carol-password", allowed=True)
    # Dovecot reads the userdb extra field: IMAP reports 1 MB (in KiB) for carol only.
    assert b"STORAGE 0 1024" in quota_of(mail, CAROL, "carol-password")
    assert b"STORAGE" not in quota_of(mail, BOB, BOB_PW)

    assert mail.smtp_send("a@remote.test", CAROL, client_ip="192.0.2.1", subject="small").accepted
    mail.wait_for_delivery(CAROL, "carol-password")

    big = (
        "From: <a@remote.test>\r\nTo: <x@example.test>\r\nSubject: big\r\n\r\n"
        + "0123456789 0123456789 0123456789 0123456789 0123456789 0123456789\r\n" * BIG_BODY_LINES
    )
    for rcpt in (CAROL, BOB):
        sent = mail.smtp_send("a@remote.test", rcpt, client_ip="192.0.2.1", message=big)
        assert sent.accepted, sent
    # Bob has no quota of his own (and mail.mailbox_quota_mb is 0): his copy arrives.
    (bobs,) = mail.wait_for_delivery(BOB, BOB_PW)
    assert bobs["Subject"] == "big"
    # Carol's LMTP delivery is refused for her quota: bounced, not delivered.
    log = mail.wait_for_log("status=bounced", timeout=15.0)
    carol_lines = [line for line in log.splitlines() if f"to=<{CAROL}>" in line]
    assert any("status=bounced" in line and "Quota exceeded" in line for line in carol_lines), (
        carol_lines
    )
    assert [m["Subject"] for m in mail.imap_fetch(CAROL, "carol-password")] == ["small"]

    # Back to the default (none): the same message fits now.
    users(mail, config_file, "quota", CAROL, "0")
    deadline = time.monotonic() + LOGIN_SETTLE
    while b"STORAGE" in quota_of(mail, CAROL, "carol-password"):
        assert time.monotonic() < deadline, "the quota change never reached Dovecot"
        time.sleep(0.2)
    assert mail.smtp_send("a@remote.test", CAROL, client_ip="192.0.2.1", message=big).accepted
    messages = mail.wait_for_delivery(CAROL, "carol-password", count=2)
    assert [m["Subject"] for m in messages] == ["small", "big"]
