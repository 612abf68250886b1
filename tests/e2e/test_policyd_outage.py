"""policyd down behind a real Postfix: the mail waits, and nothing forbidden gets in meanwhile.

policyd.unreachable_action (default DEFER_IF_PERMIT) is what Postfix answers when it cannot
reach policyd at all; README "Reliability". A private Postfix + Dovecot on loopback, posing
as remote clients with XCLIENT; policyd is SIGKILLed, as a crash would.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.gateway import PolicydGateway, submit_authenticated
from tests.fixtures.mail_system import MailSystemFactory
from tests.fixtures.policyd_daemon import start_policyd

pytestmark = pytest.mark.e2e

USER, PASSWORD = "alice@example.test", "alice-secret"
FORBIDDEN_CLIENT = "198.51.100.7"

StartGateway = Callable[..., PolicydGateway]


@pytest.fixture
def start_gateway(mail_system_factory: MailSystemFactory) -> Iterator[StartGateway]:
    started: list[tuple[PolicydGateway, Path]] = []

    def start(mail_config: dict[str, Any] | None = None) -> PolicydGateway:
        directory = Path(tempfile.mkdtemp(prefix="pw-outage-"))
        directory.chmod(0o755)  # smtpd runs as postfix and must reach the socket
        policyd = start_policyd(
            directory,
            {
                "policyd": {"socket_mode": "0660", "socket_group": "postfix"},
                "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
            },
            tcp=False,
        )
        assert policyd.socket_path is not None
        mail = mail_system_factory(mail_config, policyd_socket=str(policyd.socket_path))
        gateway = PolicydGateway(mail, policyd)
        started.append((gateway, directory))
        gateway.cli("lists", "add", "forbidden", FORBIDDEN_CLIENT)
        # The list is live in policyd: the forbidden client is refused while it runs.
        refused = gateway.send_until(
            lambda r: r.code >= 500, "someone@sender.test", USER, client_ip=FORBIDDEN_CLIENT
        )
        assert (refused.stage, refused.code) == ("rcpt", 554), refused
        return gateway

    yield start
    for gateway, directory in started:
        gateway.mail.stop()
        gateway.policyd.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def _kill_policyd(gateway: PolicydGateway) -> None:
    gateway.policyd.send_signal(signal.SIGKILL)
    gateway.policyd.process.wait(timeout=10)


def test_with_policyd_killed_a_forbidden_client_waits_and_postfix_logs_it(
    start_gateway: StartGateway,
) -> None:
    gateway = start_gateway()
    _kill_policyd(gateway)
    result = gateway.mail.smtp_send("someone@sender.test", USER, client_ip=FORBIDDEN_CLIENT)
    assert (result.stage, result.code) == ("rcpt", 450), result
    assert "policy service unavailable; try again later" in result.text
    # And any other inbound mail waits too (it could not be checked), visibly in the log.
    other = gateway.mail.smtp_send("friend@sender.test", USER, client_ip="198.51.100.8")
    assert (other.stage, other.code) == ("rcpt", 450), other
    log = gateway.mail.wait_for_log("policy service unavailable", timeout=10)
    assert "NOQUEUE: reject: RCPT from mail.remote.test[198.51.100.8]: 450" in log
    assert "problem talking to server" in log
    assert gateway.mail.queue() == []


def test_with_policyd_killed_a_logged_in_user_still_sends(start_gateway: StartGateway) -> None:
    # Submission never asks the policy service: an outage of policyd does not touch it.
    gateway = start_gateway()
    _kill_policyd(gateway)
    submit_authenticated(gateway.mail, (USER, PASSWORD), "bob@example.test", "during outage")
    [message] = gateway.mail.wait_for_delivery("bob@example.test", "bob-secret")
    assert message["Subject"] == "during outage"


def test_unreachable_action_dunno_lets_the_forbidden_client_in(
    start_gateway: StartGateway,
) -> None:
    # The choice config check warns about: shown here so the warning's claim is true.
    gateway = start_gateway({"policyd": {"unreachable_action": "DUNNO"}})
    _kill_policyd(gateway)
    result = gateway.mail.smtp_send("someone@sender.test", USER, client_ip=FORBIDDEN_CLIENT)
    assert result.accepted, result
