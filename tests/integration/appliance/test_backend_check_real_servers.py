"""`postwarden check backend` against a real Postfix and Dovecot as the backend.

The private instance (tests/fixtures/mail_system.py) has its own trustme CA and a
certificate for mx.example.test, localhost and 127.0.0.1; its submission, IMAP and POP3
ports speak STARTTLS, its smtps, imaps and pop3s ports TLS at once. What the stubs of
test_backend_check.py imitate is checked here against the real servers' own words.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mail_system import MailSystem, MailSystemFactory
from tests.fixtures.policyd_daemon import POSTWARDEN


def backend_config(
    tmp_path: Path,
    system: MailSystem,
    ports: dict[str, tuple[str, str]],
    certificate_name: str | None = None,
) -> Path:
    """[gateway] pointing at the instance: {service: (port key, security)}."""
    ca_file = tmp_path / "gwcheck-backend-ca.pem"
    system.ca.cert_pem.write_to_path(str(ca_file))
    lines = [
        '[mail]\nhostname = "gw.example.test"\n',
        "[gateway]",
        "enabled = true",
        'domains = ["backend.example.test"]',
        f'ca = "{ca_file}"',
    ]
    if certificate_name is not None:
        lines.append(f'certificate_name = "{certificate_name}"')
    for service, (port_key, security) in ports.items():
        lines += [
            f"\n[gateway.{service}]",
            'host = "127.0.0.1"',
            f"port = {system.ports[port_key]}",
            f'security = "{security}"',
        ]
    path = tmp_path / "gwcheck.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def check(config: Path) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [POSTWARDEN, "--config", str(config), "check", "backend", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def dovecot_sessions(system: MailSystem, protocol: str) -> tuple[str, list[str]]:
    """Dovecot's log and its lines about TLS sessions of `protocol`, once there are some
    (its log process writes a moment after the session ends; waited for at most 5 s)."""
    deadline = time.monotonic() + 5.0
    while True:
        log = system.dovecot_log
        ours = [
            line
            for line in log.splitlines()
            if f"{protocol}-login: " in line and "lip=127.0.0.1, TLS" in line
        ]
        if ours or time.monotonic() > deadline:
            return log, ours
        time.sleep(0.1)


STARTTLS_PORTS = {
    "smtp": ("submission_port", "starttls"),
    "imap": ("imap_port", "starttls"),
    "pop3": ("pop3_port", "starttls"),
}
TLS_PORTS = {
    "smtp": ("smtps_port", "tls"),
    "imap": ("imaps_port", "tls"),
    "pop3": ("pop3s_port", "tls"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("ports", [STARTTLS_PORTS, TLS_PORTS], ids=["starttls", "tls"])
def test_real_postfix_and_dovecot_are_verified_and_see_no_login(
    ports: dict[str, tuple[str, str]], mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    code, report = check(backend_config(tmp_path, system, ports))
    verdicts = {c["check"]: c["verdict"] for c in report["checks"]}
    assert (code, verdicts) == (0, dict.fromkeys(ports, "verified")), report
    greetings = {c["check"]: c["greeting"] for c in report["checks"]}
    assert re.match(r"220 mx\.example\.test ESMTP", greetings["smtp"]), greetings
    assert greetings["imap"].startswith("* OK "), greetings
    assert greetings["pop3"].startswith("+OK "), greetings
    # Dovecot closes each of our (TLS) sessions as one that never tried to log in; the
    # fixture's readiness probes are the plain connections closed before that.
    for protocol in ("imap", "pop3"):
        log, ours = dovecot_sessions(system, protocol)
        assert ours, log
        assert all("(no auth attempts in " in line for line in ours), ours
    assert "auth failed" not in log and "Login: user=" not in log, log
    # Postfix counts each session's commands: ours are exactly these (AUTH would be auth=).
    service = "submission" if ports is STARTTLS_PORTS else "smtps"
    commands = (
        "ehlo=2 starttls=1 quit=1 commands=4" if service == "submission" else "quit=1 commands=1"
    )
    # (Waiting for the expected line: postlogd writes it a moment after the session ends.)
    postfix_log = system.wait_for_log(f"127.0.0.1] {commands}")
    ours = [
        line
        for line in postfix_log.splitlines()
        if f"{service}/smtpd[" in line and "disconnect from" in line
    ]
    assert [line.split("disconnect from localhost[127.0.0.1] ")[-1] for line in ours] == [
        commands
    ], ours


@pytest.mark.e2e
def test_real_postfix_with_a_certificate_for_other_names_is_wrong_name(
    mail_system_factory: MailSystemFactory, tmp_path: Path
) -> None:
    system = mail_system_factory()
    config = backend_config(
        tmp_path, system, {"smtp": STARTTLS_PORTS["smtp"]}, certificate_name="backend.example.test"
    )
    code, report = check(config)
    (smtp,) = report["checks"]
    assert (code, smtp["verdict"]) == (1, "wrong_name"), smtp
    assert smtp["found"] == (
        "certificate names mx.example.test, localhost, 127.0.0.1, not backend.example.test"
    )
