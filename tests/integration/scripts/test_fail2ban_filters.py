"""The fail2ban jails the appliance installs (scripts/fail2ban/postwarden.conf) match the
login failures a real Postfix and a real Dovecot log, and not the logins that worked.

The failures are made for real against a private instance (its logs are files, as on the
appliance without systemd): SMTP AUTH with a wrong password and for an unknown user on
submission (STARTTLS) and smtps, IMAP and POP3 logins likewise; then Debian's
`fail2ban-regex <log> <the jail's filter>` must report exactly those lines.
"""

from __future__ import annotations

import base64
import configparser
import imaplib
import poplib
import re
import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory

JAIL_FILE = Path(__file__).resolve().parents[3] / "scripts" / "fail2ban" / "postwarden.conf"
SMTP_JAIL = "postwarden-smtp-auth"
IMAP_POP3_JAIL = "postwarden-imap-pop3"
USER, PASSWORD = "alice@example.test", "alice-secret"
UNKNOWN_USER = "nobody@example.test"
S235_AUTH_OK = 235
S535_AUTH_FAILED = 535
LOG_TIMEOUT = 30.0


def jail_filter(jail: str) -> str:
    """The `filter = ...` of a jail in the shipped file (its @...@ lines are install-time)."""
    parser = configparser.ConfigParser(interpolation=None, allow_no_value=True)
    parser.read(JAIL_FILE)
    return parser[jail]["filter"]


def fail2ban_matches(log: str, filter_spec: str, tmp_path: Path) -> list[str]:
    """The lines of `log` that fail2ban's filter counts as failures (fail2ban-regex)."""
    program = shutil.which("fail2ban-regex")
    if program is None:
        pytest.fail("fail2ban-regex not found: install Debian's fail2ban (install-deps.sh --test)")
    path = tmp_path / f"{filter_spec.split('[')[0]}.log"
    path.write_text(log)
    done = subprocess.run(
        [program, "--out", "msg", str(path), filter_spec],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def smtp_auth(
    system: MailSystem, port_key: str, user: str, password: str, client_ip: str = HOST
) -> int:
    """One AUTH PLAIN on a fresh connection from `client_ip` (a loopback address), TLS
    first as 587/465 demand; the reply code."""
    ctx = system.client_tls_context()
    port = system.ports[port_key]
    source = (client_ip, 0)
    if port_key == "smtps_port":
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            HOST, port, context=ctx, timeout=30, source_address=source
        )
    else:
        client = smtplib.SMTP(HOST, port, timeout=30, source_address=source)
    with client:
        client.ehlo("client.test")
        if port_key != "smtps_port":
            client.starttls(context=ctx)
            client.ehlo("client.test")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {token}")
        return code


def imap_login(system: MailSystem, implicit_tls: bool, user: str, password: str) -> bool:
    ctx = system.client_tls_context()
    if implicit_tls:
        conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
            HOST, system.ports["imaps_port"], ssl_context=ctx, timeout=30
        )
    else:
        conn = imaplib.IMAP4(HOST, system.ports["imap_port"], timeout=30)
        conn.starttls(ssl_context=ctx)
    try:
        conn.login(user, password)
    except imaplib.IMAP4.error:
        return False
    finally:
        conn.logout()
    return True


def pop3_login(system: MailSystem, implicit_tls: bool, user: str, password: str) -> bool:
    ctx = system.client_tls_context()
    if implicit_tls:
        conn: poplib.POP3 = poplib.POP3_SSL(
            HOST, system.ports["pop3s_port"], context=ctx, timeout=30
        )
    else:
        conn = poplib.POP3(HOST, system.ports["pop3_port"], timeout=30)
        conn.stls(context=ctx)
    try:
        conn.user(user)
        conn.pass_(password)
    except poplib.error_proto:
        return False
    finally:
        conn.quit()
    return True


def wait_for_lines(system: MailSystem, which: str, text: str, count: int) -> str:
    """The log once it holds `count` lines containing `text` (Dovecot logs at disconnect)."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        log = system.postfix_log if which == "postfix" else system.dovecot_log
        if sum(text in line for line in log.splitlines()) >= count:
            return log
        if time.monotonic() > deadline:
            pytest.fail(f"{count} x {text!r} not logged within {LOG_TIMEOUT}s\n{system.logs()}")
        time.sleep(0.1)


def test_smtp_auth_jail_matches_each_failed_login_and_no_good_one(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    assert smtp_auth(system, "submission_port", USER, PASSWORD) == S235_AUTH_OK
    assert smtp_auth(system, "smtps_port", USER, PASSWORD) == S235_AUTH_OK
    # Each from its own loopback address: Dovecot slows down repeated failures from one
    # address until Postfix's wait for its answer runs out, and fail2ban counts per address.
    failures = {
        "127.0.0.11": ("submission_port", USER, "wrong-password"),
        "127.0.0.12": ("submission_port", UNKNOWN_USER, "guess"),
        "127.0.0.13": ("smtps_port", USER, "wrong-password"),
        "127.0.0.14": ("smtps_port", UNKNOWN_USER, "guess"),
    }
    for client_ip, (port_key, user, password) in failures.items():
        code = smtp_auth(system, port_key, user, password, client_ip)
        assert code == S535_AUTH_FAILED, system.logs()
    log = wait_for_lines(system, "postfix", "authentication failed", len(failures))
    # The good logins are in the log too, so "no match for them" means something.
    assert log.count(f"sasl_username={USER}") >= 2

    matched = fail2ban_matches(log, jail_filter(SMTP_JAIL), tmp_path)

    assert len(matched) == len(failures), f"matched: {matched}\n{log}"
    assert all("SASL PLAIN authentication failed" in line for line in matched), matched
    clients = {m.group(1) for line in matched if (m := re.search(r"\[([\d.]+)\]: SASL", line))}
    assert clients == set(failures), matched
    # From both ports: 587 logs as postfix/submission/smtpd, 465 as postfix/smtps/smtpd.
    assert sum("/submission/smtpd[" in line for line in matched) == 2, matched
    assert sum("/smtps/smtpd[" in line for line in matched) == 2, matched


def test_imap_pop3_jail_matches_each_failed_login_and_no_good_one(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    assert imap_login(system, False, USER, PASSWORD)
    assert pop3_login(system, True, USER, PASSWORD)
    # One attempt per connection: Dovecot logs one line per connection that gave up.
    assert not imap_login(system, False, USER, "wrong-password")
    assert not imap_login(system, True, UNKNOWN_USER, "guess")
    assert not pop3_login(system, False, USER, "wrong-password")
    assert not pop3_login(system, True, UNKNOWN_USER, "guess")
    log = wait_for_lines(system, "dovecot", "auth failed", 4)
    assert log.count(f"Login: user=<{USER}>") == 2

    matched = fail2ban_matches(log, jail_filter(IMAP_POP3_JAIL), tmp_path)

    assert len(matched) == 4, f"matched: {matched}\n{log}"
    assert all(f"rip={HOST}" in line and "auth failed" in line for line in matched), matched
    assert sum("imap-login:" in line for line in matched) == 2, matched
    assert sum("pop3-login:" in line for line in matched) == 2, matched


def test_port_25_rejections_match_the_stock_postfix_filter(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    """Port 25's log name is one fail2ban knows: a relay attempt from a remote client is
    found by the stock `postfix` filter (for an operator who enables that jail too)."""
    system = mail_system_factory()
    result = system.smtp_send("someone@remote.test", "victim@elsewhere.test", client_ip="192.0.2.7")
    assert not result.accepted and "Relay access denied" in result.text, result
    log = wait_for_lines(system, "postfix", "Relay access denied", 1)

    matched = fail2ban_matches(log, "postfix", tmp_path)

    assert len(matched) == 1, f"matched: {matched}\n{log}"
    assert "[192.0.2.7]" in matched[0], matched
