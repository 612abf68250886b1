"""The whole gateway at once: Postfix + Dovecot + policyd + milterd + NSD, and a smarthost.

One private Postfix + Dovecot is rendered from the one config with policyd's policy and
alias sockets and milterd's milter socket; DKIM keys are published on the loopback NSD, and
a second private Postfix + Dovecot stands for the provider's outbound relay. Remote clients
are posed with XCLIENT; what the tests read is what Dovecot stored (IMAP and POP3).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from postwarden.dkim.keys import SigningKey
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.gateway import (
    PolicydGateway,
    dkim_results,
    publish_dkim_keys,
    raw_bytes,
    signed_remote_message,
)
from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory
from tests.fixtures.milterd_daemon import MilterdHandle, start_milterd
from tests.fixtures.policyd_daemon import POSTWARDEN, start_policyd

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
DAVE, DAVE_PW = "dave@outside.test", "outside-secret"
SENDER_ZONE = "flowsender.test"  # a remote domain whose mail arrives DKIM-signed
GREYLIST_DELAY = 2.0
MAIL = {"hostname": "mx.example.test", "main_domain": "example.test"}


@dataclass
class Gateway(PolicydGateway):
    relay: MailSystem
    milterd: MilterdHandle
    remote_key: SigningKey
    nameserver: str

    def dkim_results(self, raw: bytes) -> list[str]:
        return dkim_results(raw, self.nameserver)

    def diagnostics(self) -> str:
        return f"{self.mail.logs()}\n--- policyd ---\n{self.policyd.logs()}"


@pytest.fixture
def gateway(mail_system_factory: MailSystemFactory, dns_server: DnsServer) -> Iterator[Gateway]:
    # World-traversable: Postfix's smtpd runs as `postfix` and must reach both daemons' sockets.
    directory = Path(tempfile.mkdtemp(prefix="pw-flow-"))
    directory.chmod(0o755)
    dkim, remote_key = publish_dkim_keys(dns_server, directory, SENDER_ZONE)
    dns = {"nameservers": [dns_server.nameserver], "timeout": 2.0}
    policyd = start_policyd(
        directory / "p",
        {
            "policyd": {
                "socket_mode": "0660",
                "socket_group": "postfix",
                "aliases_listen": f"unix:{directory / 'p' / 'aliases.sock'}",
            },
            "greylisting": {"enabled": True, "delay": GREYLIST_DELAY, "auto_whitelist_after": 0},
            "dns": dns,
            "mail": MAIL,
        },
        tcp=False,
    )
    milterd: MilterdHandle | None = None
    systems: list[MailSystem] = []
    try:
        (directory / "p").chmod(0o755)
        milterd = start_milterd(
            directory / "m",
            {
                "milterd": {"socket_mode": "0660", "socket_group": "postfix"},
                "dkim": dkim,
                "dns": dns,
                "mail": MAIL,
            },
        )
        (directory / "m").chmod(0o755)
        # The provider's smarthost: a second real Postfix + Dovecot holding dave's mailbox.
        relay = mail_system_factory(
            {"mail": {"hostname": "smtp.outside.test", "main_domain": "outside.test"}},
            users={DAVE: DAVE_PW},
        )
        systems.append(relay)
        assert policyd.socket_path is not None
        mail = mail_system_factory(
            {
                "mail": {
                    **MAIL,
                    "relays": [
                        {
                            "name": "isp",
                            "host": HOST,
                            "port": relay.ports["smtp_port"],
                            "starttls": "enabled",
                        }
                    ],
                }
            },
            policyd_socket=str(policyd.socket_path),
            milterd_socket=str(milterd.socket_path),
            aliases_socket=str(directory / "p" / "aliases.sock"),
        )
        systems.append(mail)
        yield Gateway(mail, policyd, relay, milterd, remote_key, dns_server.nameserver)
    finally:
        # Postfix first: its smtpd holds keep-alive connections that policyd would drain.
        for system in systems:
            system.stop()
        if milterd is not None:
            milterd.stop()
        policyd.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _signed_remote_message(gateway: Gateway, subject: str) -> bytes:
    return signed_remote_message(gateway.remote_key, BOB, subject, "Hello Bob, from outside.")


def _greylisted_then_accepted(gateway: Gateway, sender: str, client: str, subject: str) -> None:
    """Send from outside as a real server would: greylisted first, resent until accepted."""
    message = _signed_remote_message(gateway, subject)
    first = gateway.mail.smtp_send(sender, BOB, message=message, client_ip=client)
    # Greylisted: a 4xx at RCPT, so a real sending server keeps the message and retries.
    assert first.stage == "rcpt" and 400 <= first.code < 500, first
    started = time.monotonic()
    result = first
    deadline = started + GREYLIST_DELAY + 20
    while not result.accepted and time.monotonic() < deadline:
        time.sleep(0.5)
        result = gateway.mail.smtp_send(sender, BOB, message=message, client_ip=client)
    assert result.accepted, (result, gateway.diagnostics())
    assert time.monotonic() - started >= GREYLIST_DELAY - 0.5  # not let through early


def test_outside_message_is_greylisted_retried_and_delivered_with_results(
    gateway: Gateway,
) -> None:
    _greylisted_then_accepted(gateway, f"carol@{SENDER_ZONE}", "198.51.100.25", "from outside")
    (over_imap,) = gateway.mail.wait_for_delivery(BOB, BOB_PW, timeout=30)
    (over_pop3,) = gateway.mail.pop3_fetch(BOB, BOB_PW)
    for message_read in (over_imap, over_pop3):
        assert message_read["Subject"] == "from outside"
        # milterd verified the sender's signature against the NSD zone ...
        (results,) = message_read.get_all("Authentication-Results", [])
        assert str(results).startswith("mx.example.test; dkim=pass"), results
        assert f"header.d={SENDER_ZONE}" in str(results)
        # ... and policyd said how long the message was held back.
        assert "delayed" in str(message_read["X-Greylist"]), message_read.as_string()


def test_forbidden_sender_is_refused(gateway: Gateway) -> None:
    gateway.cli("lists", "add", "forbidden", "spammer@bad.test")
    refused = gateway.send_until(
        lambda r: r.stage == "rcpt" and r.code >= 500,
        "spammer@bad.test",
        BOB,
        client_ip="198.51.100.30",
        timeout=10,  # list edits reach policyd within ~1 s
    )
    assert refused.stage == "rcpt" and 500 <= refused.code < 600, (refused, gateway.diagnostics())
    # Another sender from the same client is only greylisted: the refusal was the list entry.
    other = gateway.mail.smtp_send("someone@bad.test", BOB, client_ip="198.51.100.30")
    assert other.stage == "rcpt" and 400 <= other.code < 500, other


def test_logged_in_users_mail_leaves_signed_through_the_outbound_relay(gateway: Gateway) -> None:
    sent = gateway.mail.smtp_send(
        ALICE,
        DAVE,
        subject="signed on the way out",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert sent.accepted, sent
    (message,) = gateway.relay.wait_for_delivery(DAVE, DAVE_PW, timeout=30)
    signature = str(message["DKIM-Signature"])
    assert "d=example.test" in signature and "s=s1" in signature, message.as_string()
    # The signature made by milterd survives the relay hop and verifies against NSD's key.
    assert gateway.dkim_results(raw_bytes(message)) == ["pass"]
    # It went through the configured relay service (STARTTLS offered by the smarthost).
    assert "postfix/relay-isp" in gateway.mail.postfix_log
    assert "TLS connection established from localhost[127.0.0.1]" in gateway.relay.postfix_log


def test_relaying_for_an_unknown_domain_is_refused(gateway: Gateway) -> None:
    refused = gateway.mail.smtp_send(
        "someone@remote.test", "victim@elsewhere.test", client_ip="198.51.100.40"
    )
    assert (refused.stage, refused.code) == ("rcpt", 554), refused
    assert "Relay access denied" in refused.text
    # A sender on the permitted list does not change that.
    gateway.cli("lists", "add", "permitted", "someone@remote.test")
    again = gateway.send_until(
        lambda r: r.accepted,
        "someone@remote.test",
        BOB,
        client_ip="198.51.100.40",
        timeout=10,  # list edits reach policyd within ~1 s
    )
    assert again.accepted, again  # the permitted entry is live ...
    still = gateway.mail.smtp_send(
        "someone@remote.test", "victim@elsewhere.test", client_ip="198.51.100.40"
    )
    assert (still.stage, still.code) == ("rcpt", 554), still  # ... and still no relaying
    assert "elsewhere.test" not in str(gateway.mail.queue())


def test_trace_follows_the_message_through_postfix_policyd_and_milterd(gateway: Gateway) -> None:
    sender, client = f"erin@{SENDER_ZONE}", "198.51.100.26"
    _greylisted_then_accepted(gateway, sender, client, "traced")
    gateway.mail.wait_for_delivery(BOB, BOB_PW, timeout=30)
    assert gateway.mail.layout.maillog_file is not None
    logs = [gateway.mail.layout.maillog_file, gateway.policyd.log_path, gateway.milterd.log_path]
    log_args = [arg for path in logs for arg in ("--log", str(path))]
    found = json.loads(gateway.cli("trace", "--json", "--from", sender, *log_args).stdout)
    (message,) = found["messages"]
    qid = message["queue_id"]
    text = "\n".join(line["line"] for line in message["lines"])
    # The session, policyd's RCPT verdict (joined through the instance) and its DATA line,
    # milterd's DKIM result, and the delivery into Dovecot.
    # (The session connected from 127.0.0.1 and posed as the client with XCLIENT.)
    assert re.search(r"postfix/smtpd\[\d+\]: connect from ", text), text
    assert f"{qid}: client=mail.remote.test[{client}]" in text, text
    assert re.search(r"policyd: NOQUEUE: [^\n]*rule=greylist_pass, stage=RCPT", text), text
    assert re.search(rf"policyd: {qid}: [^\n]*stage=DATA", text), text
    assert re.search(rf"milterd: {qid}: [^\n]*dkim=pass", text), text
    assert any("status=sent" in outcome for outcome in message["outcomes"]), message
    # The first, greylisted attempt never got a queue id: it is listed apart.
    refused = "\n".join(line["line"] for line in found["refused"])
    assert "Greylisted" in refused and "greylist_defer" in refused, refused
    # By queue id: the same message's lines.
    by_id = json.loads(gateway.cli("trace", "--json", qid, *log_args).stdout)
    assert by_id["messages"][0]["lines"] == message["lines"]
    # Nothing for a recipient it was not sent to: exit 1 and says so.
    none = subprocess.run(
        [POSTWARDEN, "trace", "--from", sender, "--to", "nobody@example.test", *log_args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (none.returncode, none.stderr.strip()) == (1, "no message matches"), none
