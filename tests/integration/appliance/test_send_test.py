"""`postwarden send-test` through a private Postfix: directly, and as a configured relay."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trustme

from tests.fixtures.mail_system import MailSystem, MailSystemFactory, free_port
from tests.fixtures.policyd_daemon import POSTWARDEN


def send_test(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSTWARDEN, "--config", str(config), "send-test", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SAME_CA = "the CA that signed the instance's certificate"


def relay_config(
    tmp_path: Path, system: MailSystem, ca: trustme.CA | str | None = SAME_CA, **relay: object
) -> Path:
    """A postwarden.toml whose relays point at the private instance (and at nothing);
    mail.tls.ca is the instance's own CA, another one, or unset (None)."""
    tls = ""
    if ca is not None:
        ca_file = tmp_path / "ca.pem"
        (system.ca if ca == SAME_CA else ca).cert_pem.write_to_path(str(ca_file))
        tls = f'[mail.tls]\nca = "{ca_file}"\n\n'
    fields = {"name": "inside", "host": "127.0.0.1", "port": system.ports["smtp_port"], **relay}
    body = "".join(
        f"{k} = {v!r}\n".replace("'", '"') if not isinstance(v, int) else f"{k} = {v}\n"
        for k, v in fields.items()
    )
    path = tmp_path / "postwarden.toml"
    path.write_text(
        '[mail]\nhostname = "client.example.test"\n\n'
        f"{tls}"
        f"[[mail.relays]]\n{body}\n"
        f'[[mail.relays]]\nname = "dead"\nhost = "127.0.0.1"\nport = {free_port()}\n'
        'sender_domains = ["dead.test"]\n'
    )
    return path


def test_local_submission_is_delivered(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    config = relay_config(tmp_path, system)
    done = send_test(
        config,
        "--from",
        "bob@example.test",
        "--to",
        "alice@example.test",
        "--subject",
        "hello from send-test",
        "--port",
        str(system.ports["smtp_port"]),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"accepted by 127.0.0.1:{system.ports['smtp_port']}")
    (message,) = system.wait_for_delivery("alice@example.test", "alice-secret")
    assert message["Subject"] == "hello from send-test"


def test_through_named_relay_with_required_starttls(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    config = relay_config(tmp_path, system, starttls="required")
    done = send_test(
        config, "--from", "bob@example.test", "--to", "alice@example.test", "--server", "inside"
    )
    assert done.returncode == 0, done.stderr
    assert "accepted by inside (127.0.0.1:" in done.stdout
    (message,) = system.wait_for_delivery("alice@example.test", "alice-secret")
    assert "TLS connection established" in system.postfix_log
    # It greeted the relay with the gateway's HELO name, as Postfix's own smtp client would.
    received = [str(h) for h in message.get_all("Received", [])]
    assert any(h.startswith("from client.example.test (") for h in received), received


def _send_to_inside(config: Path) -> subprocess.CompletedProcess[str]:
    return send_test(
        config, "--from", "bob@example.test", "--to", "alice@example.test", "--server", "inside"
    )


def test_without_a_ca_the_certificate_is_not_checked_as_postfix_does_not(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    """mail.tls.ca unset: Postfix encrypts to the relay without verifying (level encrypt),
    so a certificate from a CA the system does not know must not fail the test either."""
    system = mail_system_factory()
    done = _send_to_inside(relay_config(tmp_path, system, ca=None, starttls="required"))
    assert done.returncode == 0, done.stderr
    assert len(system.wait_for_delivery("alice@example.test", "alice-secret")) == 1
    assert "TLS connection established" in system.postfix_log


def test_with_a_ca_a_certificate_from_another_ca_is_refused(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    config = relay_config(tmp_path, system, ca=trustme.CA(), starttls="required")
    done = _send_to_inside(config)
    assert done.returncode == 1
    assert "inside (127.0.0.1:" in done.stderr
    assert "certificate verify failed: unable to get local issuer certificate" in done.stderr
    assert system.imap_fetch("alice@example.test", "alice-secret") == []


def test_with_a_ca_a_certificate_for_another_name_is_refused(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    """Signed by the configured CA, but not for the host the relay is reached by."""
    system = mail_system_factory(cert_names=["mx.elsewhere.test"])
    done = _send_to_inside(relay_config(tmp_path, system, starttls="required"))
    assert done.returncode == 1
    assert "certificate verify failed: IP address mismatch" in done.stderr
    # Refused in the handshake: the instance never took a message (its IMAP certificate
    # names nothing the test could verify, so its log says it instead).
    assert "from=<bob@example.test>" not in system.postfix_log


@contextmanager
def refusing_server() -> Iterator[int]:
    """A one-connection SMTP peer that refuses every recipient (as a provider would)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            conn.settimeout(10)
            reader = conn.makefile("rb")
            conn.sendall(b"220 refuser.test ESMTP\r\n")
            for line in reader:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-refuser.test\r\n250 8BITMIME\r\n")
                elif verb == b"RCPT":
                    conn.sendall(b"550 5.7.1 <nobody@example.test>: Recipient refused by test\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()
        thread.join(timeout=10)


def test_refusal_exits_1_with_the_servers_reply(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    with refusing_server() as port:
        config = relay_config(tmp_path, system, port=port, starttls="disabled")
        done = send_test(
            config,
            "--from",
            "bob@example.test",
            "--to",
            "nobody@example.test",
            "--server",
            "inside",
        )
    assert done.returncode == 1
    assert "not accepted: 550 5.7.1 <nobody@example.test>: Recipient refused by test" in done.stderr


def test_unreachable_relay_and_unknown_name(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    config = relay_config(tmp_path, system)
    dead = send_test(config, "--from", "a@dead.test", "--to", "b@x.test", "--server", "dead")
    assert dead.returncode == 1
    assert "Connection refused" in dead.stderr
    unknown = send_test(config, "--from", "a@x.test", "--to", "b@x.test", "--server", "nope")
    assert unknown.returncode == 2
    assert "no relay named 'nope' (relays: inside, dead)" in unknown.stderr
