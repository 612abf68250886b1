"""Redis stopped behind a real Postfix: addresses mapd answered before still take mail.

Postfix resolves every recipient through mapd's `aliases` socketmap (smtpd at RCPT, cleanup
for the message, and so for verify(8)'s probe). Postfix is restarted while Redis is down,
so its in-memory verify cache is empty and every recipient needs a new probe: before mapd
kept its last known answers, cleanup refused that probe (the map answered TEMP) and verify
posted no other for PROBE_TTL (1000 s, postfix/src/verify/verify.c), so RCPT got `450 4.1.1
unverified address` long after Redis was back. README "Reliability".
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures import daemon_process
from tests.fixtures.mail_system import MailSystem, MailSystemFactory, SmtpResult
from tests.fixtures.mapd_daemon import start_mapd
from tests.fixtures.policyd_daemon import POSTWARDEN, PolicydHandle, start_policyd
from tests.fixtures.redis_server import RedisServer, start_redis_server, stop_redis_server

pytestmark = pytest.mark.e2e

USERS = {
    "alice@example.test": "alice-secret",
    "bob@example.test": "bob-secret",
    "carol@example.test": "carol-secret",
}
SALES = ("sales@example.test", "alice@example.test")  # an alias, to a mailbox
# A verify probe takes a second or two (address_verify_poll_delay = 1s); 4xx until then.
ACCEPT_WITHIN = 30.0


@dataclass
class RedisGateway:
    mail: MailSystem
    policyd: PolicydHandle
    redis: RedisServer
    mapd: subprocess.Popen[bytes]
    mapd_log: Path

    def send_until_accepted(self, recipient: str) -> SmtpResult:
        """From a trusted client (policyd not asked): resent while Postfix answers 4xx."""
        deadline = time.monotonic() + ACCEPT_WITHIN
        while True:
            result = self.mail.smtp_send("someone@remote.test", recipient, subject=recipient)
            if result.accepted or result.code >= 500 or time.monotonic() > deadline:
                return result
            time.sleep(0.5)


@pytest.fixture
def redis_gateway(mail_system_factory: MailSystemFactory) -> Iterator[RedisGateway]:
    directory = Path(tempfile.mkdtemp(prefix="pw-aliascache-"))
    directory.chmod(0o755)  # smtpd and cleanup run as postfix and must reach the socket
    redis = start_redis_server(directory)
    aliases_socket = directory / "aliases.sock"
    policyd = start_policyd(
        directory / "p",
        {
            "store": {"url": redis.url, "timeout": 0.5},
            "policyd": {
                "socket_mode": "0660",
                "socket_group": "postfix",
                "aliases_listen": f"unix:{aliases_socket}",
            },
            "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
        },
        tcp=False,
        args=("--no-maps",),
    )
    mapd = None
    try:
        assert policyd.socket_path is not None
        mail = mail_system_factory(
            None,
            policyd_socket=str(policyd.socket_path),
            aliases_socket=str(aliases_socket),
            users=USERS,
        )
        mapd = start_mapd(policyd.config_path, aliases_socket)
        yield RedisGateway(mail, policyd, redis, mapd, directory / "mapd.log")
    finally:
        if mapd is not None:
            daemon_process.stop(mapd)
        policyd.stop()
        stop_redis_server(redis.process)
        subprocess.run(["rm", "-rf", str(directory)], check=False)


@pytest.mark.expect_log(r"lookup error|Temporary lookup failure")
def test_with_redis_down_across_a_postfix_restart_known_addresses_take_mail(
    redis_gateway: RedisGateway,
) -> None:
    gw = redis_gateway
    added = subprocess.run(
        [POSTWARDEN, "--config", str(gw.policyd.config_path), "aliases", "add", *SALES],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert added.returncode == 0, added.stderr
    for recipient in ("sales@example.test", "bob@example.test"):
        assert gw.send_until_accepted(recipient).accepted, gw.mail.logs()

    stop_redis_server(gw.redis.process)
    gw.mail.stop()
    gw.mail.start()  # verify's cache is in memory (address_verify_map =): every address anew

    for recipient in ("sales@example.test", "bob@example.test"):
        result = gw.send_until_accepted(recipient)
        assert result.accepted, f"{result}\n{gw.mail.logs()}"
    gw.mail.wait_for_delivery("alice@example.test", "alice-secret", count=2)
    gw.mail.wait_for_delivery("bob@example.test", "bob-secret", count=2)

    # Never asked before the outage: its probe is refused as every probe was before, and
    # the client gets a 4xx (the mail waits at the sender), never a 550.
    never = gw.mail.smtp_send("someone@remote.test", "carol@example.test")
    assert (never.stage, never.code // 100) == ("rcpt", 4), never
    assert "answering from the last known answers" in gw.mapd_log.read_text()
