"""policyd down behind a real Postfix: the mail waits, nothing forbidden gets in meanwhile,
and what does not need the policy (address resolution, logged-in users) goes on.

policyd.unreachable_action (default DEFER_IF_PERMIT) is what Postfix answers when it cannot
reach policyd at all; the lookup maps run apart in `postwarden mapd`, as the appliance runs
them (README "Reliability"). A private Postfix + Dovecot on loopback, posing as remote
clients with XCLIENT; policyd is SIGKILLed, as a crash would, or SIGSTOPped (frozen).
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import daemon_process
from tests.fixtures.gateway import PolicydGateway, submit_authenticated
from tests.fixtures.mail_system import MailSystemFactory, SmtpResult
from tests.fixtures.mapd_daemon import start_mapd
from tests.fixtures.policyd_daemon import start_policyd

pytestmark = pytest.mark.e2e

USER, PASSWORD = "alice@example.test", "alice-secret"
FORBIDDEN_CLIENT = "198.51.100.7"


@dataclass
class OutageGateway(PolicydGateway):
    """The gateway, and mapd when the maps run apart (`start_gateway(mapd=True)`)."""

    aliases_socket: Path | None = None
    mapd: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def kill_mapd(self) -> None:
        self.mapd[-1].kill()
        self.mapd[-1].wait(timeout=10)

    def start_mapd(self) -> None:
        assert self.aliases_socket is not None
        name = f"mapd-{len(self.mapd)}.log"
        self.mapd.append(start_mapd(self.policyd.config_path, self.aliases_socket, name))


StartGateway = Callable[..., OutageGateway]


@pytest.fixture
def start_gateway(mail_system_factory: MailSystemFactory) -> Iterator[StartGateway]:
    started: list[tuple[OutageGateway, Path]] = []

    def start(mail_config: dict[str, Any] | None = None, *, mapd: bool = False) -> OutageGateway:
        """policyd alone, or (mapd=True) `policyd --no-maps` beside `mapd`, as installed."""
        directory = Path(tempfile.mkdtemp(prefix="pw-outage-"))
        directory.chmod(0o755)  # smtpd runs as postfix and must reach the socket
        aliases_socket = directory / "aliases.sock"
        policyd_settings: dict[str, Any] = {"socket_mode": "0660", "socket_group": "postfix"}
        if mapd:
            policyd_settings["aliases_listen"] = f"unix:{aliases_socket}"
        policyd = start_policyd(
            directory,
            {
                "policyd": policyd_settings,
                "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
            },
            tcp=False,
            args=("--no-maps",) if mapd else (),
        )
        assert policyd.socket_path is not None
        mail = mail_system_factory(
            mail_config,
            policyd_socket=str(policyd.socket_path),
            aliases_socket=str(aliases_socket) if mapd else None,
        )
        gateway = OutageGateway(mail, policyd, aliases_socket if mapd else None)
        started.append((gateway, directory))
        if mapd:
            gateway.start_mapd()
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
        if gateway.policyd.process.poll() is None:
            gateway.policyd.send_signal(signal.SIGCONT)
        gateway.policyd.stop()
        for maps in gateway.mapd:
            daemon_process.stop(maps)
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def _kill_policyd(gateway: OutageGateway) -> None:
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


@pytest.mark.parametrize("outage", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_with_policyd_down_addresses_still_resolve_through_mapd(
    start_gateway: StartGateway, outage: signal.Signals
) -> None:
    # Every address Postfix handles goes through virtual_alias_maps: with the maps in
    # policyd, its outage answered "451 4.3.0 Temporary lookup failure" to everyone.
    gateway = start_gateway(mapd=True)
    gateway.cli("aliases", "add", "team", "bob")
    gateway.policyd.send_signal(outage)
    submit_authenticated(gateway.mail, (USER, PASSWORD), "team@example.test", "to the team")
    [message] = gateway.mail.wait_for_delivery("bob@example.test", "bob-secret")
    assert message["Subject"] == "to the team"
    assert "Temporary lookup failure" not in gateway.mail.postfix_log


def test_after_a_mapd_outage_the_same_smtpd_recovers_at_once(start_gateway: StartGateway) -> None:
    # One submission smtpd process (max_connections = 1), reused across sessions. With
    # virtual_alias_domains left at $virtual_alias_maps, smtpd cached the resolver's failure
    # for the sender/recipient pair: 451 went on after mapd was back, with no new warning.
    gateway = start_gateway({"mail": {"max_connections": 1}}, mapd=True)
    gateway.cli("aliases", "add", "crew", "bob")
    gateway.kill_mapd()

    def submit() -> SmtpResult:
        return gateway.mail.smtp_send(
            USER,
            "crew@example.test",
            subject="crew",
            port_key="submission_port",
            starttls=True,
            login=(USER, PASSWORD),
        )

    during = submit()
    assert (during.stage, during.code) == ("rcpt", 451), during
    gateway.start_mapd()
    after = submit()
    assert after.accepted, (after, gateway.mail.postfix_log)
    [message] = gateway.mail.wait_for_delivery("bob@example.test", "bob-secret")
    assert message["Subject"] == "crew"
