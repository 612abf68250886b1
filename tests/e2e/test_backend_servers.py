"""The gateway-mode backend fixture on its own: a real mail server on 127.0.0.2, a recorder.

What gateway mode's end-to-end tests rely on: the backend's Postfix accepts mail from the
gateway's hop (127.0.0.1) and delivers it into Dovecot, whose users log in with their own
(hashed) passwords over STARTTLS with the backend's certificate; the variants offer no
STARTTLS or show a certificate for another name; the recorder keeps every byte it got.
"""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.fixtures.backend_servers import BACKEND_HOST, BackendFactory, backend_factory

pytestmark = pytest.mark.e2e

ALICE, BOB = "alice@corp.test", "bob@corp.test"


@pytest.fixture
def backends() -> Iterator[BackendFactory]:
    with backend_factory() as factory:
        yield factory


def test_mail_handed_to_the_backend_arrives_in_its_mailbox(backends: BackendFactory) -> None:
    backend = backends.start()
    backend.smtp_send(BOB, ALICE, subject="into the backend")
    (message,) = backend.wait_for_delivery(ALICE)
    assert message["Subject"] == "into the backend"
    # The passwd-file holds hashes only.
    users = (backend.root / "users").read_text()
    assert "{SHA512-CRYPT}$6$" in users and backend.users[ALICE] not in users


def test_the_backend_refuses_a_wrong_password_and_login_before_starttls(
    backends: BackendFactory,
) -> None:
    backend = backends.start()
    with pytest.raises(imaplib.IMAP4.error):
        backend.imap_fetch(ALICE, "wrong")
    conn = imaplib.IMAP4(BACKEND_HOST, backend.ports["imap"], timeout=10)
    try:
        assert "LOGINDISABLED" in conn.capabilities
        with pytest.raises(imaplib.IMAP4.error):
            conn.login(ALICE, backend.users[ALICE])
    finally:
        conn.logout()


def test_the_backend_certificate_names_backend_test_and_chains_to_its_ca(
    backends: BackendFactory,
) -> None:
    backend = backends.start()
    ctx = backend.tls_context()
    with (
        socket.create_connection((BACKEND_HOST, backend.ports["imaps"]), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="backend.test") as tls,
    ):
        assert tls.recv(100).startswith(b"* OK")
    with (
        socket.create_connection((BACKEND_HOST, backend.ports["imaps"]), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="evil.test")


def test_the_wrong_name_backend_shows_a_certificate_for_evil_test(
    backends: BackendFactory,
) -> None:
    backend = backends.start(cert_names=("evil.test",))
    ctx = backend.tls_context()
    with (
        socket.create_connection((BACKEND_HOST, backend.ports["imaps"]), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="backend.test")


def test_the_plain_backend_offers_no_starttls_and_still_delivers(
    backends: BackendFactory,
) -> None:
    backend = backends.start(starttls=False)
    with smtplib.SMTP(BACKEND_HOST, backend.ports["smtp"], timeout=10) as client:
        client.ehlo("gateway.test")
        assert not client.has_extn("starttls")
    conn = imaplib.IMAP4(BACKEND_HOST, backend.ports["imap"], timeout=10)
    try:
        assert "STARTTLS" not in conn.capabilities
    finally:
        conn.logout()
    backend.smtp_send(BOB, ALICE, subject="in clear")
    (message,) = backend.wait_for_delivery(ALICE)
    assert message["Subject"] == "in clear"


def test_the_recorder_keeps_every_byte_and_offers_no_starttls(backends: BackendFactory) -> None:
    recorder = backends.recorder()
    with smtplib.SMTP(BACKEND_HOST, recorder.ports["smtp"], timeout=10) as client:
        client.ehlo("gateway.test")
        assert not client.has_extn("starttls")
    conn = imaplib.IMAP4(BACKEND_HOST, recorder.ports["imap"], timeout=10)
    assert "STARTTLS" not in conn.capabilities
    with pytest.raises(imaplib.IMAP4.error):
        conn.login("someone", "canary-pw")
    conn.logout()
    assert b"ehlo gateway.test" in recorder.received("smtp").lower()
    assert b"canary-pw" in recorder.received("imap")
    assert recorder.received("pop3") == b""
