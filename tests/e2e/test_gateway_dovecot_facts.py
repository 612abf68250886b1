"""The Dovecot facts gateway mode rests on, checked on the gateway's own rendered Dovecot.

The design study marks them VERIFY (README "Gateway mode", "What the study said"): that
Postfix's `service=smtp` requests never reach the static nopassword passdb of the IMAP and
POP3 blocks (`doveadm auth test` shows each service's answer), and that `ssl_ca` turns on
CRL checks for the login proxy's TLS to the backend, so a private CA without a CRL fails
unless `ssl_require_crl = no`, which is what render.py writes (docs/gateway-mode.md, 1.).
"""

from __future__ import annotations

import imaplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.backend_servers import BACKEND_DOMAIN, Backend, backend_factory
from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory

pytestmark = pytest.mark.e2e

ALICE = f"alice@{BACKEND_DOMAIN}"
MAIL = {"hostname": "mx.example.test", "main_domain": "example.test"}


@pytest.fixture
def gateway(mail_system_factory: MailSystemFactory) -> Iterator[tuple[MailSystem, Backend]]:
    """A gateway (Postfix + Dovecot only) in front of a real enforced-STARTTLS backend."""
    with backend_factory() as backends:
        backend = backends.start()
        mail = mail_system_factory({"mail": MAIL, "gateway": backend.gateway_config("starttls")})
        yield mail, backend


def _doveadm(mail: MailSystem, *args: str) -> subprocess.CompletedProcess[str]:
    conf = str(mail.layout.dovecot_dir / "dovecot.conf")
    return subprocess.run(
        ["doveadm", "-c", conf, *args], capture_output=True, text=True, timeout=30, check=False
    )


def _auth_test(mail: MailSystem, service: str, user: str, password: str) -> str:
    done = _doveadm(mail, "auth", "test", "-x", f"service={service}", user, password)
    return done.stdout + done.stderr


@pytest.mark.expect_log(r"imapc\([^)]*\): Authentication failed")
def test_smtp_requests_are_checked_at_the_backend_and_imap_requests_are_proxied(
    gateway: tuple[MailSystem, Backend],
) -> None:
    mail, backend = gateway
    right = backend.users[ALICE]
    # service=smtp (Postfix's SASL): passdb imap logs in at the backend, which decides.
    assert "auth succeeded" in _auth_test(mail, "smtp", ALICE, right)
    wrong = _auth_test(mail, "smtp", ALICE, "not-alices-password")
    assert "auth failed" in wrong, wrong
    # service=imap: the static passdb answers "proxy" without checking (the backend does,
    # when the login process passes the login on), as the study says it must.
    proxied = _auth_test(mail, "imap", ALICE, "not-alices-password")
    assert "auth succeeded" in proxied and "proxy" in proxied, proxied
    # A local user of ours is still the users file's, for SMTP too.
    assert "auth succeeded" in _auth_test(mail, "smtp", "alice@example.test", "alice-secret")


def _imap_login(mail: MailSystem, user: str, password: str) -> str:
    conn = imaplib.IMAP4(HOST, mail.ports["imap_port"], timeout=30)
    try:
        conn.starttls(ssl_context=mail.client_tls_context())
        try:
            return str(conn.login(user, password)[0])
        except imaplib.IMAP4.error as refused:
            return str(refused)
    finally:
        conn.shutdown()


def _reload_with(mail: MailSystem, old: str, new: str) -> None:
    conf: Path = mail.layout.dovecot_dir / "dovecot.conf"
    text = conf.read_text(encoding="utf-8")
    assert old in text
    conf.write_text(text.replace(old, new), encoding="utf-8")
    assert _doveadm(mail, "reload").returncode == 0
    time.sleep(1)  # the master restarts its login processes with the new settings


@pytest.mark.expect_log(r"CRL|proxy\(|Login failed|Disconnected")
def test_a_private_ca_without_a_crl_fails_unless_ssl_require_crl_is_off(
    gateway: tuple[MailSystem, Backend],
) -> None:
    mail, backend = gateway
    right = backend.users[ALICE]
    assert "ssl_require_crl = no\n" in (mail.layout.dovecot_dir / "dovecot.conf").read_text()
    assert _imap_login(mail, ALICE, right) == "OK"
    # The control: Dovecot's default (yes) checks the backend's chain for a CRL, which a
    # private CA without one cannot pass; the proxy then fails closed.
    _reload_with(mail, "ssl_require_crl = no\n", "ssl_require_crl = yes\n")
    refused = _imap_login(mail, ALICE, right)
    assert "temporarily unavailable" in refused, (refused, mail.dovecot_log)
    assert "unable to get certificate CRL" in mail.dovecot_log, mail.dovecot_log
    _reload_with(mail, "ssl_require_crl = yes\n", "ssl_require_crl = no\n")
    assert _imap_login(mail, ALICE, right) == "OK"
