"""The attack-surface check (vagrant/attack_surface.py) against a private gateway.

The gateway (Postfix + Dovecot rendered from the config, policyd greylisting behind it as
in the default install) runs in an empty network namespace and listens on "all" of it, IPv4
and IPv6. The check runs inside that namespace as CI runs it on the appliance: it adds its
own attacker namespace and veth pair, probes relay, AUTH before TLS, STARTTLS injection and
SMTP smuggling from 198.51.100.2 / 2001:db8::2 (not loopback, which is trusted), puts
those addresses on the permitted list for the smuggling round with the `postwarden` CLI,
and reports the accepted attacks.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.gateway_namespace import empty_namespace
from tests.fixtures.mail_system import MailSystem, MailSystemFactory
from tests.fixtures.policyd_daemon import POSTWARDEN, PolicydHandle, start_policyd

pytestmark = pytest.mark.e2e

CHECK = Path(__file__).resolve().parents[2] / "vagrant" / "attack_surface.py"
DOMAIN, USER = "example.test", "alice"
SERVICES = {
    "smtp": "smtp_port",
    "submission": "submission_port",
    "smtps": "smtps_port",
    "imap": "imap_port",
    "imaps": "imaps_port",
    "pop3": "pop3_port",
    "pop3s": "pop3s_port",
}
SUMMARY = re.compile(r"^attack surface: (\d+) probes, (\d+) accepted attacks", re.MULTILINE)


@pytest.fixture
def gateway_namespace() -> Iterator[str]:
    with empty_namespace() as name:
        yield name


@pytest.fixture
def greylisting_policyd() -> Iterator[PolicydHandle]:
    # World-traversable: Postfix's smtpd runs as `postfix` and must reach the socket (a unix
    # socket path works across network namespaces).
    directory = Path(tempfile.mkdtemp(prefix="pw-attack-"))
    directory.chmod(0o755)
    policyd = start_policyd(
        directory,
        {
            "policyd": {"socket_mode": "0660", "socket_group": "postfix"},
            # As installed: an unknown client is greylisted for minutes, not seconds.
            "greylisting": {"enabled": True, "delay": 300},
            "mail": {"hostname": "mx.example.test", "main_domain": DOMAIN},
        },
        tcp=False,
    )
    try:
        yield policyd
    finally:
        policyd.stop()
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def _gateway(
    factory: MailSystemFactory,
    namespace: str,
    policyd: PolicydHandle,
    mail: dict[str, Any] | None = None,
) -> MailSystem:
    return factory(
        {"mail": {"listen": "all", "ipv6": True, **(mail or {})}},
        policyd_socket=str(policyd.socket_path),
        listen_from_config=True,
        network_namespace=namespace,
    )


def _check(
    gateway: MailSystem, namespace: str, policyd: PolicydHandle
) -> tuple[int, str, dict[str, str]]:
    """Run the check inside the gateway's namespace: (exit status, output, verdict by probe)."""
    ports = ",".join(f"{name}={gateway.ports[key]}" for name, key in SERVICES.items())
    argv = [
        *("ip", "netns", "exec", namespace, sys.executable, str(CHECK)),
        *("--target", "198.51.100.1", "--target6", "2001:db8::1", "--ports", ports),
        *("--local-domain", DOMAIN, "--local-user", USER),
        *("--mail-root", str(gateway.layout.mail_root), "--permit-client"),
        *("--postwarden", f"{POSTWARDEN} --config {policyd.config_path}"),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)
    output = done.stdout + done.stderr
    print(output)  # the probe list, shown with the failure (or with pytest -s)
    verdicts = {}
    for line in done.stdout.splitlines():
        verdict, _, rest = line.partition(" ")
        name = rest.strip().split(":", 1)[0]
        if verdict in ("ACCEPTED", "refused", "closed", "untested"):
            verdicts[name] = verdict
    return done.returncode, output, verdicts


@pytest.mark.timeout(900)
def test_no_attack_is_accepted_from_outside(
    mail_system_factory: MailSystemFactory,
    gateway_namespace: str,
    greylisting_policyd: PolicydHandle,
) -> None:
    gateway = _gateway(mail_system_factory, gateway_namespace, greylisting_policyd)
    code, output, verdicts = _check(gateway, gateway_namespace, greylisting_policyd)
    summary = SUMMARY.search(output)
    assert summary is not None, output
    accepted = [name for name, verdict in verdicts.items() if verdict == "ACCEPTED"]
    assert accepted == [] and summary.group(2) == "0", f"{output}\n{gateway.logs()}"
    assert code == 0, output
    # Every group ran, over both families, and nothing was skipped as closed or untested.
    assert int(summary.group(1)) >= 200, output
    assert set(verdicts.values()) == {"refused"}, output
    for prefix in (
        "relay/smtp-v4/",
        "relay/smtp-v6/",
        "relay+permitted/smtp-v6/",
        "relay/submission-v4-starttls/",
        "relay/smtps-v6/",
        "auth-before-tls/imap-v4/",
        "auth-before-tls/pop3-v6/",
        "starttls-injection/smtp-v4/",
        "starttls-injection/imap-v6/",
        "smuggling/smtp-v4/",
    ):
        assert any(name.startswith(prefix) for name in verdicts), (prefix, output)
    assert sum(name.startswith("relay/smtp-v4/") for name in verdicts) >= 20
    # The permitted entries (past greylisting) are gone again.
    listed = subprocess.run(
        [POSTWARDEN, "--config", str(greylisting_policyd.config_path), "lists", "show"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert "198.51.100.2" not in listed.stdout, listed.stdout


@pytest.mark.timeout(900)
def test_smuggling_is_reported_when_the_protection_is_off(
    mail_system_factory: MailSystemFactory,
    gateway_namespace: str,
    greylisting_policyd: PolicydHandle,
) -> None:
    # Proof that the check can fail: Postfix 3.7 without smtpd_forbid_bare_newline ends DATA
    # at a bare-LF dot line, and the commands after it run as a second message.
    gateway = _gateway(
        mail_system_factory,
        gateway_namespace,
        greylisting_policyd,
        {"smuggling_protection": False},
    )
    code, output, verdicts = _check(gateway, gateway_namespace, greylisting_policyd)
    assert code == 1, output
    assert verdicts["smuggling/smtp-v4/LF.LF"] == "ACCEPTED", output
    assert verdicts["smuggling/smtp-v4/CR.CR"] == "refused", output
    summary = SUMMARY.search(output)
    assert summary is not None and int(summary.group(2)) >= 1, output
