"""`postwarden supervise`: a killed daemon serves again at once; one that keeps dying backs off.

The daemon is real (policyd as a subprocess on a temp socket); the supervisor is the real
console command. docs/ARCHITECTURE.md, "Supervision".
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures import daemon_process
from tests.fixtures.policyd_daemon import POSTWARDEN, PolicydHandle, StartPolicyd, to_toml

# Bounded waits, never timing assertions: CI's appliance run prints the measured figure.
WAIT = 15.0


def _child_pids(handle: PolicydHandle) -> list[int]:
    return [int(p) for p in re.findall(r"started policyd \(pid (\d+)\)", handle.logs())]


def _answers(handle: PolicydHandle) -> bool:
    try:
        with handle.connect(timeout=1.0) as sock:
            sock.sendall(b"request=smtpd_access_policy\nprotocol_state=CONNECT\n\n")
            return sock.recv(100).startswith(b"action=")
    except OSError:
        return False


def _wait_for(condition: Callable[[], bool], what: str, logs: Callable[[], str]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {WAIT}s:\n{logs()}")
        time.sleep(0.02)


def _is_gone(pid: int) -> bool:
    # A zombie still has /proc/PID: gone means reaped.
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.expect_log(r"supervise: policyd was killed by SIGKILL")
def test_a_killed_daemon_is_reaped_and_serving_again(policyd_daemon: StartPolicyd) -> None:
    handle = policyd_daemon(tcp=False, supervised=True)
    first = _child_pids(handle)[-1]
    os.kill(first, signal.SIGKILL)
    killed_at = time.monotonic()
    _wait_for(lambda: len(_child_pids(handle)) == 2, "a second start", handle.logs)
    _wait_for(lambda: _answers(handle), "an answer from the new policyd", handle.logs)
    serving_after = time.monotonic() - killed_at
    print(f"serving again {serving_after:.2f} s after SIGKILL")
    assert _is_gone(first), "the killed daemon was left a zombie"
    assert "supervise: policyd was killed by SIGKILL after" in handle.logs()
    assert handle.process.poll() is None  # the supervisor itself runs on


def test_sigterm_stops_the_daemon_and_the_supervisor(policyd_daemon: StartPolicyd) -> None:
    handle = policyd_daemon(tcp=False, supervised=True)
    child = _child_pids(handle)[-1]
    assert handle.stop() == 0
    assert _is_gone(child)
    assert len(_child_pids(handle)) == 1  # stopping is not a crash: no restart


def test_sighup_reaches_the_daemon(policyd_daemon: StartPolicyd) -> None:
    handle = policyd_daemon(tcp=False, supervised=True)
    handle.send_signal(signal.SIGHUP)
    handle.wait_for_log("policyd: config reloaded from", timeout=WAIT)
    assert len(_child_pids(handle)) == 1


@pytest.mark.expect_log(
    r"policyd: cannot start", r"supervise: policyd keeps dying", r"exited with status 1"
)
def test_a_daemon_that_keeps_dying_backs_off_and_says_so_once(tmp_path: Path) -> None:
    # A valid config whose socket directory does not exist: policyd exits 1 at every start.
    config = tmp_path / "postwarden.toml"
    config.write_text(
        to_toml(
            {
                "store": {"url": f"sqlite://{tmp_path / 'state.db'}"},
                "policyd": {"listen": [f"unix:{tmp_path / 'missing' / 'policyd.sock'}"]},
            }
        ),
        encoding="utf-8",
    )
    log_path = tmp_path / "supervise.log"
    process = daemon_process.spawn(
        [POSTWARDEN, "--config", str(config), "supervise", "policyd"], log_path, tmp_path
    )

    def logs() -> str:
        return log_path.read_text(encoding="utf-8", errors="replace")

    try:
        # Three quick exits at the short delay, then a doubling one: six starts in a few s.
        _wait_for(lambda: logs().count("started policyd") >= 6, "six starts", logs)
    finally:
        assert daemon_process.stop(process) == 0
    text = logs()
    assert text.count("supervise: policyd keeps dying") == 1
    # While backing off, an exit is not logged again and again by the supervisor.
    assert text.count("supervise: policyd exited with status 1") == 3


def test_a_bad_config_is_refused_before_anything_is_supervised(tmp_path: Path) -> None:
    config = tmp_path / "postwarden.toml"
    config.write_text("[policyd]\nworkers = -1\n", encoding="utf-8")
    result = subprocess.run(
        [POSTWARDEN, "--config", str(config), "supervise", "policyd"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert result.returncode == 2
    assert "policyd.workers" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_daemon_gets_the_hard_open_file_limit(policyd_daemon: StartPolicyd) -> None:
    # At a soft limit of 1024 milterd stopped accepting at about 1,000 sessions, silently.
    # Started from a soft limit below the hard one, as systemd's default 1024 would be.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024, hard - 1), hard))
    try:
        handle = policyd_daemon(tcp=False, supervised=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    child = _child_pids(handle)[-1]
    limits = Path(f"/proc/{child}/limits").read_text()
    [line] = [row for row in limits.splitlines() if row.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    assert soft == hard, line
