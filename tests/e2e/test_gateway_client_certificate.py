"""The backend trusts the gateway's hop by its client certificate (README "Gateway mode").

The backend here is set up as the README tells a Postfix backend to be: no trusted
address at all (`mynetworks` empty), `smtpd_tls_ask_ccert`, the gateway's certificate
fingerprint in `relay_clientcerts`, `permit_tls_clientcerts` as the only way in. A gateway
with `gateway.client_cert` gets its users' mail delivered there; the same gateway without
it is refused by the backend, so the trust really was the certificate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.fixtures.backend_servers import BACKEND_DOMAIN, Backend, backend_factory
from tests.fixtures.mail_system import MailSystem, MailSystemFactory

pytestmark = pytest.mark.e2e

ALICE, BOB = f"alice@{BACKEND_DOMAIN}", f"bob@{BACKEND_DOMAIN}"
MAIL = {"hostname": "mx.example.test", "main_domain": "example.test"}


def _fingerprint(pem: bytes) -> str:
    """SHA-256 of the certificate as Postfix and `openssl x509 -fingerprint` print it."""
    digest = x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


@pytest.fixture
def client_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """The gateway's client certificate and key, its CA's file, and its fingerprint."""
    directory = tmp_path_factory.mktemp("gwclientcert")
    directory.chmod(0o755)
    ca = trustme.CA()
    leaf = ca.issue_cert("gateway.example.test")
    cert, key, ca_file = directory / "gw.crt", directory / "gw.key", directory / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file, _fingerprint(leaf.cert_chain_pems[0].bytes())


@pytest.fixture
def backend(client_pair: tuple[Path, Path, Path, str]) -> Iterator[Backend]:
    _, _, ca_file, fingerprint = client_pair
    with backend_factory() as backends:
        yield backends.start(client_certificates=(ca_file, (fingerprint,)))


def _submit(mail: MailSystem, backend: Backend, subject: str) -> None:
    sent = mail.smtp_send(
        ALICE,
        BOB,
        subject=subject,
        port_key="submission_port",
        starttls=True,
        login=(ALICE, backend.users[ALICE]),
    )
    assert sent.accepted, (sent, mail.logs())


def test_with_its_client_certificate_the_gateways_relayed_mail_is_accepted(
    mail_system_factory: MailSystemFactory,
    backend: Backend,
    client_pair: tuple[Path, Path, Path, str],
) -> None:
    cert, key, _, _ = client_pair
    table = backend.gateway_config("starttls", client_cert=str(cert), client_key=str(key))
    mail = mail_system_factory({"mail": MAIL, "gateway": table})
    _submit(mail, backend, "trusted by certificate")
    (message,) = backend.wait_for_delivery(BOB, timeout=30)
    assert message["Subject"] == "trusted by certificate"
    # The backend verified the certificate (chain to its CA) before it let the hop relay.
    assert "Trusted TLS connection established from" in backend.postfix_log, backend.logs()


@pytest.mark.expect_log(r"Client host rejected|status=bounced|Access denied")
def test_without_it_the_same_gateway_is_refused_by_the_backend(
    mail_system_factory: MailSystemFactory, backend: Backend
) -> None:
    mail = mail_system_factory({"mail": MAIL, "gateway": backend.gateway_config("starttls")})
    _submit(mail, backend, "no certificate")
    deadline = time.monotonic() + 30
    while "Client host rejected" not in backend.postfix_log:
        assert time.monotonic() < deadline, (mail.logs(), backend.logs())
        time.sleep(0.3)
    assert f"from=<{ALICE}>, size=" not in backend.postfix_log  # nothing queued there
    assert backend.imap_fetch(BOB, backend.users[BOB]) == []
