"""The appliance's logrotate rules (scripts/logrotate/) rotate for real, and every
writer keeps logging into the new file afterwards: Postfix (postlogd, after the reload),
Dovecot (after `doveadm log reopen`) and policyd started the way install.sh starts it
without systemd (start-stop-daemon --output, rotated by copytruncate).

The rules run as shipped, only pointed at a private Postfix + Dovecot and a temporary
directory: each path and command that is replaced must be found in the file.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.mail_system import MailSystem, MailSystemFactory
from tests.fixtures.policyd_daemon import POSTWARDEN, to_toml

RULES_DIR = Path(__file__).resolve().parents[3] / "scripts" / "logrotate"
RULES = (RULES_DIR / "postwarden", RULES_DIR / "postwarden-mail")
LOG_TIMEOUT = 15.0
USER, PASSWORD = "alice@example.test", "alice-secret"


def logrotate() -> str:
    program = shutil.which("logrotate")
    if program is None:
        pytest.fail("logrotate not found: install Debian's logrotate (install-deps.sh)")
    return program


def rules_for(system: MailSystem, daemon_logs: Path) -> str:
    """The shipped rules with the appliance's paths and commands swapped for the instance's."""
    layout = system.layout
    assert layout.maillog_file is not None and layout.dovecot_log_file is not None
    text = "\n".join(rules.read_text() for rules in RULES)
    swaps = {
        "/var/log/mail.log": str(layout.maillog_file),
        "/var/log/dovecot.log": str(layout.dovecot_log_file),
        "/var/log/postwarden/*.log": f"{daemon_logs}/*.log",
        "/usr/sbin/postfix status": f"/usr/sbin/postfix -c {layout.postfix_dir} status",
        "/usr/sbin/postfix reload": f"/usr/sbin/postfix -c {layout.postfix_dir} reload",
        "/usr/bin/doveadm log reopen": (
            f"/usr/bin/doveadm -c {layout.dovecot_dir / 'dovecot.conf'} log reopen"
        ),
    }
    for old, new in swaps.items():
        assert old in text, f"{RULES_DIR} no longer names {old!r}: update this test"
        text = text.replace(old, new)
    return text


def wait_for(path: Path, text: str) -> str:
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not in {path} within {LOG_TIMEOUT}s:\n{content}")
        time.sleep(0.1)


class PolicydAsInstalled:
    """policyd run as scripts/install.sh runs it without systemd (start-stop-daemon)."""

    def __init__(self, directory: Path, log: Path) -> None:
        self.socket = directory / "policyd.sock"
        self.pidfile = directory / "policyd.pid"
        self.log = log
        config = directory / "postwarden.toml"
        config.write_text(
            to_toml(
                {
                    "store": {"url": f"sqlite://{directory / 'state.db'}"},
                    "policyd": {"listen": [f"unix:{self.socket}"], "log_level": "info"},
                }
            )
        )
        subprocess.run(
            [
                *("start-stop-daemon", "--start", "--background", "--make-pidfile"),
                *("--pidfile", str(self.pidfile), "--umask", "0007", "--output", str(log)),
                *("--startas", POSTWARDEN, "--", "--config", str(config), "policyd"),
            ],
            check=True,
            timeout=30,
        )

    def ask(self, sender: str) -> None:
        """One policy request; policyd logs its decision with this sender."""
        request = (
            "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n"
            f"client_name=remote.test\nsender={sender}\nrecipient=alice@example.test\n\n"
        )
        deadline = time.monotonic() + LOG_TIMEOUT
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(5)
                    sock.connect(str(self.socket))
                    sock.sendall(request.encode())
                    assert sock.recv(1000).startswith(b"action=")
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(
            [
                *("start-stop-daemon", "--stop", "--pidfile", str(self.pidfile)),
                *("--remove-pidfile", "--retry", "TERM/15/KILL/5", "--oknodo"),
            ],
            check=False,
            timeout=60,
        )


@pytest.fixture
def policyd_as_installed(tmp_path: Path) -> Iterator[PolicydAsInstalled]:
    logs = tmp_path / "postwarden-logs"
    logs.mkdir()
    daemon = PolicydAsInstalled(tmp_path, logs / "policyd.log")
    try:
        yield daemon
    finally:
        daemon.stop()


def test_shipped_rules_parse_without_errors(tmp_path: Path) -> None:
    done = subprocess.run(
        [logrotate(), "--debug", "--state", str(tmp_path / "state"), *map(str, RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower(), done.stderr
    for log in ("/var/log/mail.log", "/var/log/dovecot.log", "/var/log/postwarden/*.log"):
        assert f"rotating pattern: {log} " in done.stderr, done.stderr


def test_forced_rotation_keeps_postfix_dovecot_and_policyd_logging(
    mail_system_factory: MailSystemFactory,
    policyd_as_installed: PolicydAsInstalled,
    tmp_path: Path,
) -> None:
    system = mail_system_factory()
    layout = system.layout
    assert layout.maillog_file is not None and layout.dovecot_log_file is not None
    policyd = policyd_as_installed
    # Something in each log before the rotation.
    assert system.smtp_send("bob@example.test", USER, subject="before").accepted
    system.wait_for_delivery(USER, PASSWORD)
    policyd.ask("before@remote.test")
    wait_for(layout.maillog_file, "status=sent")
    wait_for(layout.dovecot_log_file, f"Login: user=<{USER}>")
    wait_for(policyd.log, "from=<before@remote.test>")
    rules = tmp_path / "rules"
    rules.write_text(rules_for(system, policyd.log.parent))

    done = subprocess.run(
        [logrotate(), "--force", "--verbose", "--state", str(tmp_path / "state"), str(rules)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    for log in (layout.maillog_file, layout.dovecot_log_file, policyd.log):
        assert Path(f"{log}.1").exists(), f"{log} not rotated:\n{done.stderr}"
    assert "status=sent" in Path(f"{layout.maillog_file}.1").read_text()
    assert "from=<before@remote.test>" in Path(f"{policyd.log}.1").read_text()
    # After it, each writer logs into the new file.
    assert system.smtp_send("bob@example.test", USER, subject="after").accepted
    system.wait_for_delivery(USER, PASSWORD, count=2)
    policyd.ask("after@remote.test")
    postfix_now = wait_for(layout.maillog_file, "status=sent")
    assert "starting the Postfix mail system" not in postfix_now
    dovecot_now = wait_for(layout.dovecot_log_file, f"Login: user=<{USER}>")
    assert "starting up" not in dovecot_now
    policyd_now = wait_for(policyd.log, "from=<after@remote.test>")
    assert "from=<before@remote.test>" not in policyd_now
    # copytruncate with a writer that does not append would leave a hole of NUL bytes.
    assert "\0" not in policyd_now, "policyd's log does not append: copytruncate corrupts it"
