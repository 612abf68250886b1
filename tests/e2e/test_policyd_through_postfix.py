"""policyd behind a real Postfix: what a remote client sees at RCPT time, and what reaches Dovecot.

A private Postfix (smtpd_recipient_restrictions ending in check_policy_service) and Dovecot
run on loopback; the test poses as remote clients with XCLIENT. Lists are edited with the
`postwarden lists` CLI against the daemon's store while everything runs.
"""

from __future__ import annotations

import json
import re
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

USER, PASSWORD = "alice@example.test", "alice-secret"
GREYLIST_DELAY = 2.0


@dataclass
class Gateway(PolicydGateway):
    def lists(self, *args: str) -> None:
        """Run `postwarden lists ...` against the daemon's store, as an operator would."""
        self.cli("lists", *args)


@pytest.fixture
def gateway(mail_system_factory: MailSystemFactory) -> Iterator[Gateway]:
    # Our own world-traversable directory: Postfix's smtpd runs as `postfix` and must reach
    # the policyd socket (pytest's own temp root is private to root).
    directory = Path(tempfile.mkdtemp(prefix="pw-policyd-"))
    directory.chmod(0o755)
    policyd = start_policyd(
        directory,
        {
            "policyd": {
                "socket_mode": "0660",
                "socket_group": "postfix",
                "aliases_listen": f"unix:{directory / 'aliases.sock'}",
            },
            "greylisting": {"enabled": True, "delay": GREYLIST_DELAY, "auto_whitelist_after": 0},
            # The same [mail] as the Postfix side: alias commands need our domains.
            "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
        },
        tcp=False,
    )
    mail: MailSystem | None = None
    try:
        assert policyd.socket_path is not None
        mail = mail_system_factory(
            policyd_socket=str(policyd.socket_path),
            aliases_socket=str(directory / "aliases.sock"),
        )
        yield Gateway(mail, policyd)
    finally:
        # Postfix first: its smtpd holds keep-alive connections that policyd would drain.
        if mail is not None:
            mail.stop()
        policyd.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def test_forbidden_client_ip_is_refused_at_rcpt(gateway: Gateway) -> None:
    gateway.lists("add", "forbidden", "198.51.100.7")
    result = gateway.send_until(
        lambda r: r.stage == "rcpt" and r.code >= 500,
        "someone@sender.test",
        USER,
        client_ip="198.51.100.7",
    )
    assert result.stage == "rcpt", (result, gateway.mail.postfix_log)
    assert 500 <= result.code < 600, result
    # A client not on the list is still only greylisted, not refused.
    other = gateway.mail.smtp_send("someone@sender.test", USER, client_ip="198.51.100.8")
    assert other.stage == "rcpt" and 400 <= other.code < 500, other


def test_neutral_sender_is_deferred_then_delivered_with_x_greylist(gateway: Gateway) -> None:
    args = ("news@neutral.test", USER)
    first = gateway.mail.smtp_send(*args, client_ip="192.0.2.25", subject="greylisted")
    assert first.stage == "rcpt" and 400 <= first.code < 500, first
    started = time.monotonic()

    result = first
    deadline = started + GREYLIST_DELAY + 10
    while not result.accepted and time.monotonic() < deadline:
        time.sleep(0.5)
        result = gateway.mail.smtp_send(*args, client_ip="192.0.2.25", subject="greylisted")
    assert result.accepted, (result, gateway.policyd.logs())
    # Not let through before the delay had passed.
    assert time.monotonic() - started >= GREYLIST_DELAY - 0.5

    (message,) = gateway.mail.wait_for_delivery(USER, PASSWORD)
    assert message["Subject"] == "greylisted"
    assert "X-Greylist" in message, message.as_string()
    assert "delayed" in str(message["X-Greylist"])


def test_permitted_sender_is_accepted_at_once(gateway: Gateway) -> None:
    gateway.lists("add", "permitted", "boss@partner.test")
    result = gateway.send_until(
        lambda r: r.accepted, "boss@partner.test", USER, client_ip="192.0.2.77", subject="hi"
    )
    assert result.accepted, (result, gateway.policyd.logs())
    (message,) = gateway.mail.wait_for_delivery(USER, PASSWORD)
    assert message["Subject"] == "hi"
    assert "X-Greylist" not in message


def test_policyd_lines_join_postfix_queue_id_through_the_instance(gateway: Gateway) -> None:
    # At RCPT Postfix has no queue id yet (policyd logs NOQUEUE); the DATA-stage request of
    # the same SMTP transaction (same instance) carries the one Postfix logs.
    gateway.lists("add", "permitted", "joined@partner.test")
    result = gateway.send_until(
        lambda r: r.accepted, "joined@partner.test", USER, client_ip="192.0.2.78"
    )
    assert result.accepted, result
    queue_id = result.text.rsplit(" ", 1)[-1]  # "2.0.0 Ok: queued as QUEUEID"
    assert re.search(rf"postfix/smtpd\[\d+\]: {queue_id}: client=", gateway.mail.postfix_log)
    logs = gateway.policyd.wait_for_log(f"policyd: {queue_id}: ", timeout=10)
    rcpt = re.search(
        r"policyd: NOQUEUE: .*from=<joined@partner\.test>, .*stage=RCPT, instance=([^,]+)", logs
    )
    data = re.search(rf"policyd: {queue_id}: .*stage=DATA, instance=([^,]+)", logs)
    assert rcpt is not None and data is not None, logs
    assert rcpt.group(1) == data.group(1)


def test_permitted_sender_cannot_relay_to_a_foreign_domain(gateway: Gateway) -> None:
    gateway.lists("add", "permitted", "boss@partner.test")
    gateway.lists("add", "permitted", "192.0.2.77")
    # Once the lists are live the same sender reaches our own domain at once ...
    ok = gateway.send_until(lambda r: r.accepted, "boss@partner.test", USER, client_ip="192.0.2.77")
    assert ok.accepted, ok
    # ... but relaying elsewhere is refused by Postfix before policyd is asked.
    result = gateway.mail.smtp_send(
        "boss@partner.test", "victim@elsewhere.test", client_ip="192.0.2.77"
    )
    assert result.stage == "rcpt" and result.code == 554, result
    assert "Relay access denied" in result.text


def test_forwarding_group_added_while_running_delivers_to_every_member(gateway: Gateway) -> None:
    gateway.cli("aliases", "add", "sales@example.test", USER, "bob@example.test")
    gateway.lists("add", "permitted", "buyer@customer.test")  # skip greylisting here
    result = gateway.send_until(
        lambda r: r.accepted,
        "buyer@customer.test",
        "sales@example.test",
        client_ip="192.0.2.88",
        subject="order",
    )
    assert result.accepted, (result, gateway.mail.postfix_log)
    (to_alice,) = gateway.mail.wait_for_delivery(USER, PASSWORD)
    (to_bob,) = gateway.mail.wait_for_delivery("bob@example.test", "bob-secret")
    assert to_alice["Subject"] == to_bob["Subject"] == "order"


# --- `postwarden explain`: the same answer policyd then gives, and nothing written ----------------
def _explained(gateway: Gateway, client_ip: str, sender: str) -> tuple[str, str]:
    """`postwarden explain --json` for this RCPT: (action, rule)."""
    out = gateway.cli(
        "explain", "--json", "--client", client_ip, "--helo", "mail.sender.test",
        "--from", sender, "--to", USER,
    ).stdout  # fmt: skip
    report = json.loads(out)
    return report["action"], report["rule"]


def _policyd_said(gateway: Gateway, client_ip: str, count: int) -> list[tuple[str, str]]:
    """policyd's RCPT-stage (action, rule) for this client, once `count` lines are logged."""
    pattern = re.compile(
        rf"client=[^\[]*\[{re.escape(client_ip)}\], .*to=<{re.escape(USER)}>, "
        r"verdict=(\w+), rule=(\w+), stage=RCPT"
    )
    deadline = time.monotonic() + 5
    while len(found := pattern.findall(gateway.policyd.logs())) < count:
        assert time.monotonic() < deadline, gateway.policyd.logs()
        time.sleep(0.1)
    return found


def test_explain_gives_the_answer_policyd_then_gives_and_writes_nothing(gateway: Gateway) -> None:
    ip, sender = "198.51.100.61", "news@explained.test"
    # New triplet: greylisted; explaining wrote no record of it (a real request would).
    assert _explained(gateway, ip, sender) == ("DEFER_IF_PERMIT", "greylist_defer")
    stored = json.loads(gateway.cli("greylist", "show", "--json").stdout)["triplets"]
    assert not [t for t in stored if sender in t["key"]], stored
    first = gateway.mail.smtp_send(sender, USER, client_ip=ip, helo="mail.sender.test")
    assert first.stage == "rcpt" and 400 <= first.code < 500, first
    assert _policyd_said(gateway, ip, 1) == [("DEFER_IF_PERMIT", "greylist_defer")]
    stored = json.loads(gateway.cli("greylist", "show", "--json").stdout)["triplets"]
    assert [t for t in stored if sender in t["key"]], stored  # the real request wrote it
    # After the delay explain says the retry passes, and policyd lets that retry in.
    time.sleep(GREYLIST_DELAY + 0.5)
    action, rule = _explained(gateway, ip, sender)
    assert (action, rule) == ("PREPEND", "greylist_pass"), (action, rule)
    second = gateway.mail.smtp_send(sender, USER, client_ip=ip, helo="mail.sender.test")
    assert second.accepted, (second, gateway.policyd.logs())
    assert _policyd_said(gateway, ip, 2)[1] == (action, rule)
    # A forbidden sender: explain names the list rule policyd then refuses with.
    gateway.lists("add", "forbidden", "spam@explained.test")
    refused = gateway.send_until(
        lambda r: r.stage == "rcpt" and r.code >= 500,
        "spam@explained.test",
        USER,
        client_ip="198.51.100.62",
    )
    assert refused.code >= 500, refused
    said = _policyd_said(gateway, "198.51.100.62", 1)[-1]
    assert _explained(gateway, "198.51.100.62", "spam@explained.test") == said
    assert said[0] == "REJECT"
