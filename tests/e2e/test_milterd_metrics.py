"""milterd's Prometheus metrics behind a real Postfix: each message it handled, counted once.

A private Postfix (smtpd_milters = milterd's socket) and Dovecot on loopback, keys on the
loopback NSD as in test_dkim_through_postfix. One message submitted by a logged-in user on
587 (signed) and one arriving signed from a remote domain on 25 (verified) must move
milterd's counters by exactly those two messages.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.dns_server import DnsServer
from tests.fixtures.gateway import publish_dkim_keys, signed_remote_message, submit_authenticated
from tests.fixtures.mail_system import MailSystemFactory
from tests.fixtures.milterd_daemon import start_milterd
from tests.fixtures.policyd_daemon import free_tcp_port
from tests.integration.milterd.test_milterd_metrics import sample, scrape

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
SENDER_ZONE = "metricsender.test"
MESSAGES = "postwarden_milter_messages_total"


def test_a_signed_submission_and_a_verified_arrival_are_counted_once_each(
    mail_system_factory: MailSystemFactory, dns_server: DnsServer
) -> None:
    # World-traversable: Postfix's smtpd runs as `postfix` and must reach milterd's socket.
    directory = Path(tempfile.mkdtemp(prefix="milterdmetrics-e2e-"))
    directory.chmod(0o755)
    port = free_tcp_port()
    dkim, remote_key = publish_dkim_keys(dns_server, directory, SENDER_ZONE)
    milterd = start_milterd(
        directory,
        {
            "milterd": {
                "socket_mode": "0660",
                "socket_group": "postfix",
                "metrics_listen": f"127.0.0.1:{port}",
            },
            "dkim": dkim,
            "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0},
            "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
        },
    )
    try:
        mail = mail_system_factory(milterd_socket=str(milterd.socket_path))
        before = scrape("127.0.0.1", port)
        assert sample(before, MESSAGES) == 0

        submit_authenticated(mail, (ALICE, ALICE_PW), BOB, "signed by the gateway")
        inbound = signed_remote_message(remote_key, BOB, "hello bob", "A signed message.")
        sent = mail.smtp_send(
            f"carol@{SENDER_ZONE}", BOB, message=inbound, client_ip="198.51.100.20"
        )
        assert sent.accepted, sent
        delivered = mail.wait_for_delivery(BOB, BOB_PW, count=2)
        by_subject = {str(m["Subject"]): m for m in delivered}
        assert "d=example.test" in str(by_subject["signed by the gateway"]["DKIM-Signature"])
        assert str(by_subject["hello bob"]["Authentication-Results"]).startswith(
            "mx.example.test; dkim=pass"
        )

        # Counted at end of message, before Postfix's 250: the counts are final here.
        text = scrape("127.0.0.1", port)
        assert sample(text, MESSAGES, rule="sign", dkim="signed") == 1
        assert sample(text, MESSAGES, rule="verify", dkim="pass") == 1
        assert sample(text, MESSAGES) == 2
        assert sample(text, "postwarden_milter_message_seconds_count") == 2
        assert sample(text, "postwarden_milter_errors_total") == 0
    finally:
        code = milterd.stop()
        logs = milterd.logs()
        shutil.rmtree(directory, ignore_errors=True)
    assert code == 0 and "Traceback" not in logs, logs
