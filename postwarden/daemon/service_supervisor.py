"""`postwarden supervise DAEMON`: run a daemon as a child, start it again when it dies.

docs/ARCHITECTURE.md, "Supervision". Both service paths run the daemons under this: systemd
starts it (and restarts it, should it die itself); without systemd, install.sh does with
start-stop-daemon. Being the daemon's parent it reaps the daemon the moment it exits, so a
killed daemon never lingers as a zombie that a restart would take for a running one. When
to start again is restart_backoff's pure decision.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from postwarden.daemon.child_processes import die_with_parent
from postwarden.daemon.restart_backoff import (
    STABLE_AFTER,
    RestartState,
    after_exit,
    stayed_up,
)
from postwarden.daemon.startup import EXIT_OK, EXIT_STARTUP_FAILED

log = logging.getLogger("postwarden.supervise")

SUPERVISED_DAEMONS = ("policyd", "mapd", "milterd", "frontd")
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def daemon_command(daemon: str, config_path: Path | None, args: Sequence[str] = ()) -> list[str]:
    """The command line that runs `daemon [args]` with this interpreter and config file."""
    config = ["--config", str(config_path)] if config_path is not None else []
    return [sys.executable, "-m", "cli", *config, daemon, *args]


def raise_open_file_limit() -> None:
    """Soft limit of open files up to the hard one, for this process and the daemon it runs.

    Each Postfix connection is a descriptor: at the usual soft limit of 1024, libmilter
    stops accepting at about 1,000 concurrent sessions and logs nothing of it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def exit_description(returncode: int) -> str:
    """`exited with status 1` or `was killed by SIGKILL`, from a Popen returncode."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class ServiceSupervisor:
    """Runs one daemon's command until told to stop; see the module docstring."""

    def __init__(
        self, daemon: str, command: Sequence[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.daemon = daemon
        self.command = list(command)
        self.clock = clock
        self._signals: list[int] = []
        self._stopping = False
        self._wakeup_read = -1

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; the exit code for the supervisor itself."""
        raise_open_file_limit()
        self._wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        for sig in _FORWARDED:
            signal.signal(sig, self._on_signal)
        state = RestartState()
        while not self._stopping:
            try:
                child = self._start()
            except OSError as exc:
                log.error("supervise: cannot start %s: %s", self.daemon, exc)
                return EXIT_STARTUP_FAILED
            started = self.clock()
            state = self._wait_for_exit(child, started, state)
            if self._stopping:
                break
            decision = after_exit(state, started, self.clock())
            state = decision.state
            how = exit_description(child.returncode)
            if decision.starts_backing_off:
                log.error(
                    "supervise: %s keeps dying (%d exits within %.0f s of starting, the last "
                    "%s); starting it again after a growing delay, now %.1f s",
                    self.daemon,
                    state.quick_exits,
                    STABLE_AFTER,
                    how,
                    decision.delay,
                )
            elif not state.backing_off:
                log.warning(
                    "supervise: %s %s after %.1f s; starting it again in %.1f s",
                    self.daemon,
                    how,
                    self.clock() - started,
                    decision.delay,
                )
            self._sleep(decision.delay)
        return EXIT_OK

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _start(self) -> subprocess.Popen[bytes]:
        parent = os.getpid()

        def in_child() -> None:
            # SIGTERM, not SIGKILL: a daemon whose supervisor was killed finishes what is in
            # flight, then frees its socket for the replacement.
            if not die_with_parent(parent, signal.SIGTERM):
                os._exit(EXIT_STARTUP_FAILED)

        # preexec_fn is safe here: the supervisor runs no threads.
        child = subprocess.Popen(self.command, preexec_fn=in_child)
        log.info("supervise: started %s (pid %d)", self.daemon, child.pid)
        return child

    def _wait_for_exit(
        self, child: subprocess.Popen[bytes], started: float, state: RestartState
    ) -> RestartState:
        """Forward signals to the child until it exits (reaped); the state, maybe reset."""
        pidfd = os.pidfd_open(child.pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.register(self._wakeup_read, select.POLLIN)
            while True:
                timeout = None
                if state.backing_off:
                    timeout = max(0, int((started + STABLE_AFTER - self.clock()) * 1000) + 1)
                ready = {fd for fd, _ in poller.poll(timeout)}
                self._forward_signals(child)
                if pidfd in ready:
                    child.wait()
                    return state
                recovered = stayed_up(state, started, self.clock())
                if recovered is not None:
                    log.warning(
                        "supervise: %s has stayed up %.0f s: restarts are immediate again",
                        self.daemon,
                        STABLE_AFTER,
                    )
                    state = recovered
        finally:
            os.close(pidfd)

    def _forward_signals(self, child: subprocess.Popen[bytes]) -> None:
        self._drain_wakeup()
        while self._signals:
            sig = self._signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._stopping = True
                sig = signal.SIGTERM
            if child.returncode is None:
                child.send_signal(sig)

    def _sleep(self, seconds: float) -> None:
        """Wait before a restart; a stop signal ends the wait (and the supervisor)."""
        deadline = self.clock() + seconds
        poller = select.poll()
        poller.register(self._wakeup_read, select.POLLIN)
        while not self._stopping and (left := deadline - self.clock()) > 0:
            poller.poll(int(left * 1000) + 1)
            self._drain_wakeup()
            while self._signals:
                if self._signals.pop(0) in (signal.SIGTERM, signal.SIGINT):
                    self._stopping = True

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup_read, 512):
                pass
        except BlockingIOError:
            pass
