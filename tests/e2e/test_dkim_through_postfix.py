"""milterd behind a real Postfix: submitted mail comes out signed, inbound mail gets A-R.

A private Postfix (smtpd_milters = milterd's unix socket, milter_protocol = 6,
milter_default_action = tempfail) and Dovecot run on loopback; keys are published on the
loopback NSD. What the tests read is what Dovecot stored, fetched over IMAP.
"""

from __future__ import annotations

import email.utils
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postwarden.dkim.keys import SigningKey
from postwarden.dkim.signing import parse_message, sign
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.gateway import dkim_results, publish_dkim_keys, raw_bytes
from tests.fixtures.mail_system import MailSystem, MailSystemFactory, SmtpResult
from tests.fixtures.milterd_daemon import MilterdHandle, start_milterd

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
SENDER_ZONE = "dkimsender.test"  # a remote domain whose mail arrives signed
# A restarted milterd must be taken back by Postfix within this many seconds.
RETRY_WINDOW = 30.0
RETRY_PAUSE = 0.5


@dataclass
class Gateway:
    mail: MailSystem
    milterd: MilterdHandle
    directory: Path
    remote_key: SigningKey
    nameserver: str

    def verify(self, raw: bytes) -> list[str]:
        return dkim_results(raw, self.nameserver)


@pytest.fixture
def gateway(mail_system_factory: MailSystemFactory, dns_server: DnsServer) -> Iterator[Gateway]:
    # World-traversable: Postfix's smtpd runs as `postfix` and must reach milterd's socket.
    directory = Path(tempfile.mkdtemp(prefix="pw-milterd-"))
    directory.chmod(0o755)
    dkim, remote_key = publish_dkim_keys(dns_server, directory, SENDER_ZONE)
    milterd = start_milterd(
        directory,
        {
            "milterd": {"socket_mode": "0660", "socket_group": "postfix", "log_level": "debug"},
            "dkim": dkim,
            "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0},
            "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
        },
    )
    gateway = Gateway(
        None,  # type: ignore[arg-type]  # set below, once Postfix runs
        milterd,
        directory,
        remote_key,
        dns_server.nameserver,
    )
    try:
        gateway.mail = mail_system_factory(milterd_socket=str(milterd.socket_path))
        yield gateway
    finally:
        gateway.milterd.stop()  # a test may have replaced it with a restarted daemon
        shutil.rmtree(directory, ignore_errors=True)


def _remote_message(gateway: Gateway, subject: str, body: str) -> bytes:
    """From carol at the remote domain, signed there; with a Date, as a real MUA writes it
    (Date is oversigned even when absent: a receiver adding one must break the signature)."""
    key = gateway.remote_key
    message = (
        f"From: Carol <carol@{key.domain}>\r\nTo: <{BOB}>\r\nSubject: {subject}\r\n"
        f"Date: {email.utils.formatdate()}\r\n"
        f"Message-ID: <{time.time_ns()}@{key.domain}>\r\n\r\n{body}\r\n"
    ).encode()
    headers, body_bytes = parse_message(message)
    (signature,) = sign(headers, body_bytes, [key])
    return signature.field + message


def test_authenticated_submission_comes_out_signed_and_verifies(gateway: Gateway) -> None:
    sent = gateway.mail.smtp_send(
        ALICE,
        BOB,
        subject="signed by the gateway",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert sent.accepted, sent
    (message,) = gateway.mail.wait_for_delivery(BOB, BOB_PW)
    assert "d=example.test" in str(message["DKIM-Signature"])
    assert "s=s1" in str(message["DKIM-Signature"])
    assert gateway.verify(raw_bytes(message)) == ["pass"]
    assert message["Authentication-Results"] is None  # outgoing: signed, not verified


def test_inbound_signed_mail_gets_pass_and_tampered_gets_fail(gateway: Gateway) -> None:
    good = _remote_message(gateway, "hello bob", "A signed message.")
    assert gateway.mail.smtp_send(
        f"carol@{SENDER_ZONE}", BOB, message=good, client_ip="198.51.100.20"
    ).accepted
    tampered = _remote_message(gateway, "hello again", "The original text.").replace(
        b"The original text.", b"Text changed on the way."
    )
    assert gateway.mail.smtp_send(
        f"carol@{SENDER_ZONE}", BOB, message=tampered, client_ip="198.51.100.20"
    ).accepted
    forged = (
        b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
        + _remote_message(gateway, "forged results", "Trust me.")
    )
    assert gateway.mail.smtp_send(
        f"carol@{SENDER_ZONE}", BOB, message=forged, client_ip="198.51.100.20"
    ).accepted
    messages = gateway.mail.wait_for_delivery(BOB, BOB_PW, count=3)
    by_subject = {str(m["Subject"]): m for m in messages}
    good_ar = by_subject["hello bob"].get_all("Authentication-Results", [])
    assert len(good_ar) == 1 and str(good_ar[0]).startswith("mx.example.test; dkim=pass"), good_ar
    assert f"header.d={SENDER_ZONE}" in str(good_ar[0])
    bad_ar = by_subject["hello again"].get_all("Authentication-Results", [])
    assert len(bad_ar) == 1 and "dkim=fail" in str(bad_ar[0]), bad_ar
    forged_ar = by_subject["forged results"].get_all("Authentication-Results", [])
    assert len(forged_ar) == 1, forged_ar
    assert "bank.test" not in str(forged_ar[0]) and "dkim=pass" in str(forged_ar[0])


def test_killed_milter_makes_postfix_defer_not_lose(gateway: Gateway) -> None:
    gateway.milterd.kill()  # no goodbye: as if it crashed
    message = _remote_message(gateway, "while milterd is down", "Deferred, then delivered.")
    refused = gateway.mail.smtp_send(
        f"carol@{SENDER_ZONE}", BOB, message=message, client_ip="198.51.100.20"
    )
    # milter_default_action = tempfail: a 4xx, so the sending server keeps and retries it.
    assert not refused.accepted
    assert 400 <= refused.code < 500, refused
    assert gateway.mail.imap_fetch(BOB, BOB_PW) == []
    # start_milterd returns once the new daemon answers a milter negotiation itself.
    gateway.milterd = start_milterd(gateway.directory, gateway.milterd.config)
    retried = _send_until_accepted(gateway, message)
    (delivered,) = gateway.mail.wait_for_delivery(BOB, BOB_PW)
    assert str(delivered["Authentication-Results"]).startswith("mx.example.test; dkim=pass")
    assert "while milterd is down" in str(delivered["Subject"]), retried


def _send_until_accepted(gateway: Gateway, message: bytes) -> SmtpResult:
    """Resend like a sending MTA would, while the answer stays 4xx, within a bounded window.

    Under heavy load a Postfix smtpd may still answer one session with its milter default
    action just after the milter came back. Only a 4xx is retried: a 5xx or a lost message
    fails, and the caller checks the mailbox holds exactly one copy.
    """
    deadline = time.monotonic() + RETRY_WINDOW
    for _ in range(int(RETRY_WINDOW / RETRY_PAUSE) + 1):
        sent = gateway.mail.smtp_send(
            f"carol@{SENDER_ZONE}", BOB, message=message, client_ip="198.51.100.20"
        )
        if sent.accepted:
            return sent
        assert 400 <= sent.code < 500, sent  # never refused for good
        assert gateway.milterd.alive(), gateway.milterd.logs()
        if time.monotonic() > deadline:
            break
        time.sleep(RETRY_PAUSE)
    pytest.fail(
        f"still deferred {RETRY_WINDOW}s after milterd came back: {sent}\n"
        f"{gateway.milterd.logs()}\n{gateway.mail.logs()}"
    )
