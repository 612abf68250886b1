"""The seed's forwarding examples through a real Postfix + Dovecot, edited live with the CLI.

Postfix looks each recipient up in policyd's socketmap at delivery time, so every rule below
is added (and removed) while everything runs, with no postmap and no reload:
alias (manager -> alice), vacation copy (bob -> alice, bob: bob keeps his mail), external
address (ceo -> a mailbox on a second real Postfix + Dovecot, the outbound relay) and removal.
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
from tests.fixtures.policyd_daemon import start_policyd

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
OUTSIDE, OUTSIDE_PW = "ceo@gmail.example", "ceo-secret"
QUEUE_TIMEOUT = 15.0
# Local mailboxes are verified at RCPT; a first probe still running is answered 4xx, which a
# sending MTA retries. The test retries the same way, within this bound.
RETRY_TIMEOUT = 20.0


@dataclass
class Gateway(PolicydGateway):
    # The outbound relay: a second private Postfix + Dovecot holding OUTSIDE's mailbox.
    outside: MailSystem

    def send(self, recipient: str, subject: str) -> None:
        # From loopback, a trusted network: no greylisting in the way of the forwarding.
        deadline = time.monotonic() + RETRY_TIMEOUT
        result = self.mail.smtp_send("sender@example.test", recipient, subject=subject)
        while not result.accepted and 400 <= result.code < 500 and time.monotonic() < deadline:
            time.sleep(0.5)
            result = self.mail.smtp_send("sender@example.test", recipient, subject=subject)
        assert result.accepted, (result, self.mail.postfix_log)

    def subjects(self, user: str, password: str, count: int) -> list[str]:
        return sorted(
            str(m["Subject"]) for m in self.mail.wait_for_delivery(user, password, count=count)
        )


@pytest.fixture
def gateway(mail_system_factory: MailSystemFactory) -> Iterator[Gateway]:
    # Postfix's daemons run as `postfix` and must reach the sockets: a world-traversable dir.
    directory = Path(tempfile.mkdtemp(prefix="pw-aliases-"))
    directory.chmod(0o755)
    aliases_socket = directory / "aliases.sock"
    policyd = start_policyd(
        directory,
        {
            "policyd": {
                "socket_mode": "0660",
                "socket_group": "postfix",
                "aliases_listen": f"unix:{aliases_socket}",
            },
            "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
        },
        tcp=False,
    )
    systems: list[MailSystem] = []
    try:
        assert policyd.socket_path is not None
        outside = mail_system_factory(
            {"mail": {"hostname": "mx.gmail.example", "main_domain": "gmail.example"}},
            users={OUTSIDE: OUTSIDE_PW},
        )
        systems.append(outside)
        relay = {
            "name": "out",
            "host": "127.0.0.1",
            "port": outside.ports["smtp_port"],
            "starttls": "disabled",
        }
        mail = mail_system_factory(
            {"mail": {"relays": [relay]}},
            policyd_socket=str(policyd.socket_path),
            aliases_socket=str(aliases_socket),
        )
        systems.append(mail)
        yield Gateway(mail, policyd, outside)
    finally:
        # Postfix first: its smtpd holds keep-alive connections that policyd would drain.
        for system in reversed(systems):
            system.stop()
        policyd.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def test_alias_delivers_to_its_target(gateway: Gateway) -> None:
    gateway.cli("aliases", "add", "manager", "alice")
    gateway.send("manager@example.test", "for the manager")
    assert gateway.subjects(ALICE, ALICE_PW, 1) == ["for the manager"]


def test_vacation_copy_keeps_the_mail_and_forwards_it(gateway: Gateway) -> None:
    gateway.cli("aliases", "add", "bob", "alice", "bob")
    gateway.send(BOB, "while bob is away")
    assert gateway.subjects(BOB, BOB_PW, 1) == ["while bob is away"]
    assert gateway.subjects(ALICE, ALICE_PW, 1) == ["while bob is away"]


def test_external_address_is_relayed_out(gateway: Gateway) -> None:
    gateway.cli("aliases", "add", "ceo", OUTSIDE)
    gateway.send("ceo@example.test", "to the ceo")
    (message,) = gateway.outside.wait_for_delivery(OUTSIDE, OUTSIDE_PW)
    assert message["Subject"] == "to the ceo"
    # It left through the relay: the gateway's log says so (the queue file may linger a
    # moment after the relay's 250, so the log, not the queue, is the witness).
    relay = f"relay=127.0.0.1[127.0.0.1]:{gateway.outside.ports['smtp_port']}"
    assert any(
        f"to=<{OUTSIDE}>, orig_to=<ceo@example.test>, {relay}," in line and "status=sent" in line
        for line in gateway.mail.postfix_log.splitlines()
    ), gateway.mail.postfix_log


def test_removed_alias_no_longer_forwards_without_reload(gateway: Gateway) -> None:
    gateway.cli("aliases", "add", "manager", "alice")
    gateway.send("manager@example.test", "before removal")
    gateway.subjects(ALICE, ALICE_PW, 1)
    gateway.cli("aliases", "remove", "manager")
    result = gateway.mail.smtp_send("sender@example.test", "manager@example.test")
    if not result.accepted:
        # Refused at RCPT as an unknown mailbox: equally "no longer forwarded".
        assert result.stage == "rcpt" and 500 <= result.code < 600, result
    else:
        # Accepted from a trusted client, but with no alias there is no such mailbox:
        # Dovecot refuses it at LMTP and Postfix bounces it instead of forwarding it.
        queue_id = result.text.rsplit(" ", 1)[-1]
        deadline = time.monotonic() + QUEUE_TIMEOUT
        outcome = ""
        while time.monotonic() < deadline and not outcome:
            for line in gateway.mail.postfix_log.splitlines():
                if f"{queue_id}: to=<manager@example.test>" in line and "status=" in line:
                    outcome = line
            time.sleep(0.2)
        assert "status=bounced" in outcome, gateway.mail.postfix_log
    assert gateway.subjects(ALICE, ALICE_PW, 1) == ["before removal"]


def test_external_alias_is_accepted_at_once_while_the_outside_server_is_down(
    gateway: Gateway,
) -> None:
    # Recipient verification probes only our own mailboxes: an alias that forwards outside
    # is accepted at RCPT without asking the outside server, and waits in our queue for it.
    gateway.outside.stop()
    gateway.cli("aliases", "add", "ceo", OUTSIDE)
    started = time.monotonic()
    result = gateway.mail.smtp_send("sender@example.test", "ceo@example.test", subject="queued")
    assert result.accepted, (result, gateway.mail.postfix_log)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + QUEUE_TIMEOUT
    while time.monotonic() < deadline and not any(
        OUTSIDE in str(message.get("recipients")) for message in gateway.mail.queue()
    ):
        time.sleep(0.2)
    assert any(OUTSIDE in str(m.get("recipients")) for m in gateway.mail.queue()), (
        gateway.mail.postfix_log
    )
