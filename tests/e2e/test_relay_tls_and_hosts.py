"""Relay next hops given by host name, mail.tls.ca verifying the outbound relay, and the
relay's timeout.

A second private Postfix + Dovecot stands for the inside server (relay domains) or the
provider's smarthost (outbound relays); the gateway is rendered from the setting under test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.fixtures.gateway import submit_authenticated
from tests.fixtures.mail_system import MailSystem, MailSystemFactory

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
DAVE, DAVE_PW = "dave@outside.test", "outside-secret"
DEFER_TIMEOUT = 30.0


def _second_server(
    factory: MailSystemFactory, domain: str, user: str, pw: str, **options: Any
) -> MailSystem:
    """A second real Postfix + Dovecot holding `user`'s mailbox in `domain`."""
    # As a relay with credentials it lets that login send as the gateway's domain
    # (postwarden binds a login to the senders it owns on 587/465).
    mail = {"hostname": f"mx.{domain}", "main_domain": domain}
    return factory(
        {"mail": {**mail, "sender_grants": {user: ["@example.test"]}}},
        users={user: pw},
        **options,
    )


def _wait_deferred(mail: MailSystem, timeout: float = DEFER_TIMEOUT) -> dict[str, Any]:
    """Poll the queue until one message is deferred with a reason; return its recipient."""
    deadline = time.monotonic() + timeout
    queue: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        queue = mail.queue()
        for entry in queue:
            for rcpt in entry.get("recipients", []):
                if entry.get("queue_name") == "deferred" and rcpt.get("delay_reason"):
                    return dict(rcpt)
        time.sleep(0.2)
    pytest.fail(f"no deferred message within {timeout}s: {queue}\n{mail.logs()}")


# --- relay domains named by host -------------------------------------------------------------


def test_relay_domain_given_by_host_name_is_forwarded(
    mail_system_factory: MailSystemFactory,
) -> None:
    # "localhost" comes from /etc/hosts: Postfix must look next hops up natively as well as in
    # DNS (smtp_host_lookup = dns, native), or the mail waits with "Host not found".
    inside = _second_server(mail_system_factory, "corp.test", "carol@corp.test", "corp-secret")
    gateway = mail_system_factory(
        {"mail": {"relay_domains": [f"corp.test|localhost:{inside.ports['smtp_port']}"]}}
    )
    sent = gateway.smtp_send("a@remote.test", "carol@corp.test", client_ip="192.0.2.1")
    assert sent.accepted, sent
    (message,) = inside.wait_for_delivery("carol@corp.test", "corp-secret")
    assert "by mx.example.test" in " ".join(message.get_all("Received", []))
    # The gateway went to the named host (no MX lookup for corp.test, which has none).
    log = gateway.postfix_log
    assert f"relay=localhost[127.0.0.1]:{inside.ports['smtp_port']}" in log, log
    assert "status=sent" in log, log


# --- mail.tls.ca verifies mandatory-TLS relays -----------------------------------------------


def _relay(smarthost: MailSystem, protocol: str, tmp_path: Path) -> dict[str, Any]:
    # The host is the name the smarthost's certificate carries (the fixture issues it for
    # its hostname, "localhost" and 127.0.0.1): verification checks the chain AND the name.
    if protocol == "smtps":
        password = tmp_path / "relay.pw"
        password.write_text(DAVE_PW + "\n")
        return {  # the smarthost's port 465 wants a login
            "name": "isp",
            "protocol": "smtps",
            "host": "localhost",
            "port": smarthost.ports["smtps_port"],
            "username": DAVE,
            "password_file": str(password),
            "timeout": 10,
        }
    return {
        "name": "isp",
        "host": "localhost",
        "port": smarthost.ports["smtp_port"],
        "starttls": "required",
        "timeout": 10,
    }


def _gateway_trusting(
    factory: MailSystemFactory, ca: trustme.CA, smarthost: MailSystem, protocol: str, tmp: Path
) -> MailSystem:
    """A gateway relaying to `smarthost` over `protocol`, with mail.tls.ca = `ca`."""
    ca_file = tmp / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    relay = _relay(smarthost, protocol, tmp)
    return factory({"mail": {"relays": [relay], "tls": {"ca": str(ca_file)}}})


@pytest.mark.parametrize("protocol", ["smtp", "smtps"])
def test_relay_certificate_signed_by_the_configured_ca_is_accepted(
    mail_system_factory: MailSystemFactory, tmp_path: Path, protocol: str
) -> None:
    smarthost = _second_server(mail_system_factory, "outside.test", DAVE, DAVE_PW)
    # The CA that signed the smarthost's certificate.
    gateway = _gateway_trusting(mail_system_factory, smarthost.ca, smarthost, protocol, tmp_path)
    submit_authenticated(gateway, (ALICE, ALICE_PW), DAVE, f"verified {protocol}")
    (message,) = smarthost.wait_for_delivery(DAVE, DAVE_PW)
    assert message["Subject"] == f"verified {protocol}"
    # Postfix says "Verified" only when the chain AND the name checked out.
    log = gateway.postfix_log
    assert "Verified TLS connection established to localhost[127.0.0.1]" in log, log


@pytest.mark.parametrize("protocol", ["smtp", "smtps"])
def test_relay_certificate_from_another_ca_keeps_the_mail_deferred(
    mail_system_factory: MailSystemFactory, tmp_path: Path, protocol: str
) -> None:
    smarthost = _second_server(mail_system_factory, "outside.test", DAVE, DAVE_PW)
    other_ca = trustme.CA()  # did not sign the smarthost's certificate
    gateway = _gateway_trusting(mail_system_factory, other_ca, smarthost, protocol, tmp_path)
    submit_authenticated(gateway, (ALICE, ALICE_PW), DAVE, f"unverified {protocol}")
    rcpt = _wait_deferred(gateway)
    assert rcpt["address"] == DAVE
    reason = rcpt["delay_reason"]
    assert "certificate" in reason.lower() and "verif" in reason.lower(), reason
    assert "certificate verification failed for localhost[127.0.0.1]" in gateway.postfix_log
    # Not lost, and nothing reached the smarthost.
    (entry,) = gateway.queue()
    assert entry["queue_name"] == "deferred"
    assert smarthost.imap_fetch(DAVE, DAVE_PW) == []


def test_relay_certificate_from_the_ca_for_another_name_keeps_the_mail_deferred(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    """The right CA is not enough: the certificate must name the relay's host."""
    smarthost = _second_server(
        mail_system_factory, "outside.test", DAVE, DAVE_PW, cert_names=["mx.elsewhere.test"]
    )
    gateway = _gateway_trusting(mail_system_factory, smarthost.ca, smarthost, "smtp", tmp_path)
    submit_authenticated(gateway, (ALICE, ALICE_PW), DAVE, "wrong name")
    rcpt = _wait_deferred(gateway)
    assert rcpt["address"] == DAVE
    log = gateway.postfix_log
    assert rcpt["delay_reason"] == "Server certificate not verified"
    assert "certificate verification failed for localhost[127.0.0.1]" in log, log
    assert "num=62:hostname mismatch" in log, log
    (entry,) = gateway.queue()
    assert entry["queue_name"] == "deferred"


# --- the relay's timeout ----------------------------------------------------------------------


def test_a_relay_that_never_greets_is_given_up_after_its_timeout(
    mail_system_factory: MailSystemFactory,
) -> None:
    """timeout = 3: Postfix's own default would wait 300 s for the greeting."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never says a word
        held: list[socket.socket] = []
        stop = threading.Event()

        def hold() -> None:
            silent.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    held.append(silent.accept()[0])

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        relay = {"name": "mute", "host": "127.0.0.1", "port": silent.getsockname()[1]}
        gateway = mail_system_factory({"mail": {"relays": [{**relay, "timeout": 3}]}})
        try:
            submit_authenticated(gateway, (ALICE, ALICE_PW), DAVE, "to a mute relay")
            rcpt = _wait_deferred(gateway, timeout=20)
        finally:
            stop.set()
            holder.join(timeout=5)
            for conn in held:
                conn.close()
    assert rcpt["address"] == DAVE
    assert "timed out while receiving the initial server greeting" in rcpt["delay_reason"]
    assert held, "Postfix never connected to the relay"
    (entry,) = gateway.queue()  # kept for a later try, not lost
    assert entry["queue_name"] == "deferred"
