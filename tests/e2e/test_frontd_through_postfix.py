"""frontd behind a real Postfix: with milterd or Dovecot away, a submission session still
gets STARTTLS and AUTH, and then a clear "try again later" (README "Reliability").

A private Postfix + Dovecot on loopback, rendered with [frontd] on: smtpd_milters and
smtpd_sasl_path point at frontd, Dovecot's auth listener is frontd.sasl_upstream. Without
frontd, the same outages answer STARTTLS with 454 (milterd down) or kill smtpd with
"fatal: no SASL authentication mechanisms" (Dovecot down): these tests fail there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from frontd.milter_fallback import UNAVAILABLE_REPLY
from frontd.sasl_fallback import SASL_MECHANISMS, handshake
from tests.fixtures import daemon_process
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.gateway import dkim_results, publish_dkim_keys, raw_bytes
from tests.fixtures.mail_system import MailSystem, MailSystemFactory
from tests.fixtures.milterd_daemon import MilterdHandle, start_milterd
from tests.fixtures.policyd_daemon import POSTWARDEN, to_toml

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
UPSTREAM_TIMEOUT = 1.0
RECOVERY_WINDOW = 20.0  # for Dovecot's socket to appear after its start


@dataclass
class FrontedGateway:
    mail: MailSystem
    milterd: MilterdHandle | None
    milterd_overrides: dict
    directory: Path
    frontd: subprocess.Popen[bytes]
    nameserver: str

    @property
    def frontd_log(self) -> str:
        return (self.directory / "frontd.log").read_text(errors="replace")

    def start_milterd(self) -> None:
        self.milterd = start_milterd(self.directory / "milterd", self.milterd_overrides)

    def stop_dovecot(self) -> None:
        """Dovecot alone stopped (its whole process group), as `systemctl stop dovecot`."""
        pid_file = self.mail.layout.dovecot_base_dir / "master.pid"
        pid = int(pid_file.read_text().split()[0])
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists():
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z" or time.monotonic() > deadline:
                break
            time.sleep(0.05)

    def start_dovecot(self) -> None:
        conf = str(self.mail.layout.dovecot_dir / "dovecot.conf")
        subprocess.run(["dovecot", "-c", conf], check=True, timeout=60)


@pytest.fixture
def fronted(
    mail_system_factory: MailSystemFactory, dns_server: DnsServer
) -> Iterator[FrontedGateway]:
    directory = Path(tempfile.mkdtemp(prefix="pw-frontd-"))
    directory.chmod(0o755)
    (directory / "milterd").mkdir(mode=0o755)
    dkim, _ = publish_dkim_keys(dns_server, directory, "frontd-remote.test")
    milterd_overrides = {
        "milterd": {"socket_mode": "0660", "socket_group": "postfix"},
        "dkim": dkim,
        "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0},
        "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
    }
    frontd_section = {
        "enabled": True,
        "milter_listen": f"unix:{directory / 'milter-front.sock'}",
        "sasl_listen": f"unix:{directory / 'auth-front.sock'}",
        "sasl_upstream": f"unix:{directory / 'dovecot-auth'}",
        "upstream_timeout": UPSTREAM_TIMEOUT,
        "socket_mode": "0660",
        "socket_group": "postfix",
    }
    config_path = directory / "frontd.toml"
    config_path.write_text(
        to_toml(
            {
                "milterd": {"listen": [f"unix:{directory / 'milterd' / 'milterd.sock'}"]},
                "frontd": frontd_section,
            }
        )
    )
    log_path = directory / "frontd.log"
    frontd = daemon_process.spawn(
        [POSTWARDEN, "--config", str(config_path), "frontd"], log_path, directory
    )
    daemon_process.wait_until_answers(
        "frontd",
        frontd,
        lambda: (
            (directory / "milter-front.sock").exists() and (directory / "auth-front.sock").exists()
        ),
        lambda: log_path.read_text(errors="replace"),
    )
    gateway = FrontedGateway(
        None,  # type: ignore[arg-type]  # set below, once Postfix runs
        None,
        milterd_overrides,
        directory,
        frontd,
        dns_server.nameserver,
    )
    try:
        gateway.mail = mail_system_factory(
            {"frontd": frontd_section}, milterd_socket=frontd_section["milter_listen"][5:]
        )
        yield gateway
    finally:
        if gateway.milterd is not None:
            gateway.milterd.stop()
        daemon_process.stop(frontd)
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def _submission(mail: MailSystem) -> Iterator[smtplib.SMTP]:
    client = smtplib.SMTP("127.0.0.1", mail.ports["submission_port"], timeout=30)
    try:
        client.ehlo("client.test")
        yield client
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


def test_with_milterd_down_submission_gets_starttls_and_auth_then_451_at_mail(
    fronted: FrontedGateway,
) -> None:
    with _submission(fronted.mail) as client:
        code, _ = client.starttls(context=fronted.mail.client_tls_context())
        assert code == 220  # without frontd: 454 4.3.0
        client.ehlo("client.test")
        assert "PLAIN" in client.esmtp_features.get("auth", "")
        code, _ = client.login(ALICE, ALICE_PW)
        assert code == 235
        code, text = client.mail(ALICE)
        assert (code, text.decode()) == (451, UNAVAILABLE_REPLY[4:])
    assert "milterd" in fronted.frontd_log and "does not answer" in fronted.frontd_log
    fronted.mail.wait_for_log("milter-reject: MAIL from")


def test_once_milterd_is_back_the_next_submission_is_signed(fronted: FrontedGateway) -> None:
    with _submission(fronted.mail) as client:
        client.starttls(context=fronted.mail.client_tls_context())
        client.ehlo("client.test")
        client.login(ALICE, ALICE_PW)
        assert client.mail(ALICE)[0] == 451
    fronted.start_milterd()
    sent = fronted.mail.smtp_send(
        ALICE,
        BOB,
        subject="after the outage",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert sent.accepted, sent
    (message,) = fronted.mail.wait_for_delivery(BOB, BOB_PW)
    assert dkim_results(raw_bytes(message), fronted.nameserver) == ["pass"]
    # The sessions frontd answered meanwhile (ours, and any Postfix opened on its own).
    assert re.search(r"answers again \([1-9]\d* sessions answered by frontd", fronted.frontd_log)


def _auth_plain(client: smtplib.SMTP) -> tuple[int, bytes]:
    import base64

    token = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")


def test_with_dovecot_down_auth_gets_454_and_the_session_goes_on(
    fronted: FrontedGateway,
) -> None:
    fronted.start_milterd()
    fronted.stop_dovecot()
    with _submission(fronted.mail) as client:
        client.starttls(context=fronted.mail.client_tls_context())
        client.ehlo("client.test")
        # AUTH and AUTH= (broken_sasl_auth_clients) both name frontd's stand-in mechanisms.
        assert set(client.esmtp_features.get("auth", "").split()) == set(SASL_MECHANISMS)
        code, text = _auth_plain(client)
        assert code == 454 and text.startswith(b"4.7.0 Temporary authentication failure")
        assert client.noop()[0] == 250  # still talking, not dropped
    fronted.mail.wait_for_log("authentication failed: Connection lost to authentication server")
    assert "fatal: no SASL authentication mechanisms" not in fronted.mail.postfix_log
    assert "Dovecot's auth service" in fronted.frontd_log
    fronted.start_dovecot()
    upstream = fronted.directory / "dovecot-auth"
    deadline = time.monotonic() + RECOVERY_WINDOW
    while not upstream.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    # The first login once Dovecot is back succeeds, even in an smtpd whose connection
    # frontd answered during the outage (frontd hands it over to Dovecot at the AUTH).
    with _submission(fronted.mail) as client:
        client.starttls(context=fronted.mail.client_tls_context())
        client.ehlo("client.test")
        assert _auth_plain(client)[0] == 235


def test_frontds_stand_in_greeting_announces_what_dovecot_announces(
    fronted: FrontedGateway,
) -> None:
    # Postfix offers AUTH from the greeting: ours must name Dovecot's own mechanisms.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(fronted.directory / "dovecot-auth"))
        received = b""
        while b"DONE\n" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk

    def mechanisms(greeting: bytes) -> list[bytes]:
        return [line for line in greeting.splitlines() if line.startswith(b"MECH\t")]

    assert mechanisms(received) == mechanisms(handshake(1, 1, "00"))
