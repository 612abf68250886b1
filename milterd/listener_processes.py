"""Run milterd: load config and keys once, then serve every listen address until SIGTERM.

libmilter (under pymilter) runs one thread per MTA connection and listens on one socket
per process, so the process that loaded the keys forks one listener per address and
supervises them. A unix socket is the default and the recommendation: libmilter sets no
TCP_NODELAY, so over TCP every message stalls ~40 ms (Nagle + delayed ACK).

Stopping: libmilter takes SIGTERM in its own signal thread, but its accept loop holds a lock
while it polls with a 5 s timeout, so alone it notices a stop only up to 5 s later. The
supervisor (no libmilter in it) forwards SIGTERM and then connects to each listener until it
exits: every connection wakes the poll at once. Once libmilter has a SIGTERM it serves no
further command of any session, so a listener gets it only when its messages in progress
are done (bounded by DRAIN_TIMEOUT); what is cut, Postfix defers (tempfail). Under systemd
this needs KillMode=mixed, or every process gets the SIGTERM at once.

Metrics (`milterd.metrics_listen`): the supervisor chooses prometheus_client's multiprocess
directory and binds the HTTP port before forking; each listener records into the directory
(milterd.message_metrics) and a thread of the supervisor serves the sum.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import logging
import mmap
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import Milter

from milterd.message_handler import MessageHandler
from milterd.milter import DkimMilter
from postwarden.config.model import Config
from postwarden.config.types import ListenAddress
from postwarden.daemon.child_processes import die_with_parent
from postwarden.daemon.metrics_http import (
    mark_process_dead,
    multiprocess_directory,
    multiprocess_server,
)
from postwarden.daemon.socket_files import SocketInUseError, remove_stale_socket
from postwarden.daemon.startup import (
    EXIT_CHILD_STARTUP_FAILED,
    EXIT_STARTUP_FAILED,
    StartupError,
    log_startup_failure,
)

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("postwarden.milterd")
MILTER_NAME = "postwarden-milterd"
# Seconds libmilter waits on a silent MTA connection before dropping it.
MTA_TIMEOUT = 600
SOCKET_WAIT = 10.0
# After SIGTERM: how long listeners may finish messages in progress before SIGKILL (systemd's
# TimeoutStopSec is 30 s), and how often the supervisor wakes their accept loops meanwhile.
STOP_GRACE = 25.0
# Messages in progress at a stop may finish for this long before their listener gets SIGTERM.
DRAIN_TIMEOUT = 10.0
WAKE_INTERVAL = 0.1
_SUPERVISED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


def socket_spec(address: ListenAddress) -> str:
    """libmilter's socket syntax: `unix:/path`, `inet:port@host`, `inet6:port@host`."""
    if address.kind == "unix":
        return f"unix:{address.path}"
    family = "inet6" if ":" in address.host else "inet"
    return f"{family}:{address.port}@{address.host}"


def _socket_permissions(path: Path, mode: int, group: str | None) -> None:
    # libmilter creates the socket inside runmilter; wait for it (bounded), then set owner.
    deadline = time.monotonic() + SOCKET_WAIT
    while not path.exists():
        if time.monotonic() > deadline:
            log.error("socket %s did not appear within %.0fs", path, SOCKET_WAIT)
            return
        time.sleep(0.01)
    try:
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, mode)
    except (OSError, KeyError) as exc:
        log.error("cannot set group/mode of %s: %s", path, exc)


def run(config: Config) -> int:
    """Serve until stopped; returns the process exit code. Raises StartupError."""
    cfg = config.milterd
    if cfg.socket_group is not None:
        try:
            grp.getgrnam(cfg.socket_group)
        except KeyError:
            raise StartupError(f"milterd.socket_group: no group {cfg.socket_group!r}") from None
    for address in cfg.listen:
        if address.kind == "unix" and not Path(address.path).parent.is_dir():
            parent = Path(address.path).parent
            raise StartupError(f"milterd.listen: directory {parent} does not exist")
        if address.kind == "unix":
            # Removed here, not by libmilter inside the listener: the non-root listener sets
            # the group once its socket exists, and must not find (and fix) a leftover.
            try:
                remove_stale_socket(Path(address.path))
            except SocketInUseError as exc:
                raise StartupError(f"milterd.listen: {exc}") from None
    # Once, before forking: every listener shares the parsed keys and the resolver.
    DkimMilter.handler = MessageHandler(config)
    Milter.factory = DkimMilter
    if cfg.metrics_listen is None:
        return _run_listeners(config, None)
    # Chosen before anything imports prometheus_client (see postwarden.daemon.metrics_http).
    with multiprocess_directory():
        try:
            server = multiprocess_server(cfg.metrics_listen)
        except OSError as exc:
            raise StartupError(
                f"milterd.metrics_listen: cannot listen on {cfg.metrics_listen}: {exc.strerror}"
            ) from None
        try:
            return _run_listeners(config, server)
        finally:
            server.server_close()


def _run_listeners(config: Config, metrics_server: WSGIServer | None) -> int:
    """Fork one listener per address, serve the metrics (if on) and supervise until stopped."""
    cfg = config.milterd
    # Blocked before forking, so no signal slips in between; listeners keep TERM/INT/HUP
    # blocked too, which is what libmilter's signal thread (sigwait) wants.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISED)
    children: dict[int, Listener] = {}
    supervisor = os.getpid()
    # Anonymous, shared with the children: per listener, its messages in progress and
    # whether its stop was asked for.
    shared = mmap.mmap(-1, 16 * len(cfg.listen))
    for index, address in enumerate(cfg.listen):
        busy = ctypes.c_int64.from_buffer(shared, 16 * index)
        stop_asked = ctypes.c_int64.from_buffer(shared, 16 * index + 8)
        pid = os.fork()
        if pid == 0:
            DkimMilter.busy = busy
            _serve(config, address, supervisor, stop_asked, metrics_server)
        children[pid] = Listener(address, busy, stop_asked)
    if metrics_server is None:
        return _supervise(children)
    # Started after the forks (a thread does not survive one) and with the signals blocked,
    # which it inherits: they stay the main thread's, for sigtimedwait.
    serving = threading.Thread(target=metrics_server.serve_forever, name="metrics", daemon=True)
    serving.start()
    try:
        return _supervise(children)
    finally:
        metrics_server.shutdown()


@dataclass
class Listener:
    """One listener process as the supervisor sees it."""

    address: ListenAddress
    busy: ctypes.c_int64  # its messages in progress, in shared memory
    stop_asked: ctypes.c_int64  # set before its SIGTERM, in shared memory
    stopping: bool = False  # SIGTERM sent


def _supervise(children: dict[int, Listener]) -> int:
    """Wait for a signal or a listener's exit; on either, stop all and return the exit code."""
    code = 0
    started: float | None = None  # when the stop began
    while children:
        # SIGCHLD says a listener exited; the 1 s bound only guards against a missed one.
        timeout = 1.0 if started is None else WAKE_INTERVAL
        info = signal.sigtimedwait(_SUPERVISED, timeout)
        signo = info.si_signo if info is not None else None
        if signo == signal.SIGHUP:
            # Not forwarded: libmilter would end its listener on HUP, and keys load at start.
            log.warning("SIGHUP ignored: restart milterd to load a changed config or keys")
        elif signo in (signal.SIGTERM, signal.SIGINT) and started is None:
            log.info("milterd stopping (%s)", signal.Signals(signo).name)
            started = time.monotonic()
        for pid, status in _reap(children):
            address = children.pop(pid).address
            mark_process_dead(pid)
            exit_code = os.waitstatus_to_exitcode(status)
            if started is None:
                # A listener gone on its own: stop the rest so the service manager restarts all.
                log.error("milterd listener on %s exited with %d; stopping", address, exit_code)
                failed = exit_code <= 0 or exit_code == EXIT_CHILD_STARTUP_FAILED
                code = EXIT_STARTUP_FAILED if failed else exit_code
                started = time.monotonic()
        if started is not None:
            _stop_step(children, time.monotonic() - started)
    log.info("milterd stopped")
    return code


def _stop_step(children: dict[int, Listener], elapsed: float) -> None:
    """One round of stopping: drain, SIGTERM, wake the accept loop; SIGKILL when overdue.

    Once libmilter has the SIGTERM it hands no further command to a session, so a listener
    gets it only when it has no message in progress (or DRAIN_TIMEOUT has passed).
    """
    for pid, listener in children.items():
        if elapsed > STOP_GRACE:
            log.error("milterd listener on %s did not stop; killing", listener.address)
            _signal(pid, signal.SIGKILL)
        elif not listener.stopping and (listener.busy.value <= 0 or elapsed > DRAIN_TIMEOUT):
            listener.stopping = True
            listener.stop_asked.value = 1
            _signal(pid, signal.SIGTERM)
        if listener.stopping:
            _wake(listener.address)


def _reap(children: dict[int, Listener]) -> list[tuple[int, int]]:
    done = []
    for pid in list(children):
        waited, status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            done.append((pid, status))
    return done


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wake(address: ListenAddress) -> None:
    """Connect and close: libmilter's poll returns, and it then sees the stop."""
    if address.kind == "unix":
        family: int = socket.AF_UNIX
        target: str | tuple[str, int] = address.path
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        target = (address.host, address.port)
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(WAKE_INTERVAL)
        sock.connect(target)


def _serve(
    config: Config,
    address: ListenAddress,
    supervisor: int,
    stop_asked: ctypes.c_int64,
    metrics_server: WSGIServer | None,
) -> NoReturn:
    """One listener process: libmilter on one address, until SIGTERM. Never returns."""
    code = 0
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        if metrics_server is not None:
            from milterd.message_metrics import create_metrics

            metrics_server.socket.close()  # the supervisor's to serve
            DkimMilter.metrics = create_metrics()  # into the supervisor's multiprocess directory
        _listen(config, address, supervisor, stop_asked)
    except StartupError as exc:
        log_startup_failure(log, "milterd", exc)
        code = EXIT_CHILD_STARTUP_FAILED
    except BaseException as exc:  # noqa: BLE001 - a forked child must never return into the CLI
        log.error("milterd listener on %s failed: %s: %s", address, type(exc).__name__, exc)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _listen(
    config: Config, address: ListenAddress, supervisor: int, stop_asked: ctypes.c_int64
) -> None:
    cfg = config.milterd
    mode = int(cfg.socket_mode, 8)
    if address.kind == "unix":
        path = Path(address.path)
        # Umask and effective group make the socket born with the configured mode and group:
        # no window in which Postfix (in that group) is refused, or others are let in.
        os.umask(0o777 & ~mode)
        if cfg.socket_group is not None and os.geteuid() == 0:
            os.setegid(grp.getgrnam(cfg.socket_group).gr_gid)
        elif cfg.socket_group is not None:
            # Not root: chgrp once the socket exists (to a group this user is in).
            threading.Thread(
                target=_socket_permissions, args=(path, mode, cfg.socket_group), daemon=True
            ).start()
    # A listener must not outlive its supervisor (it would hold the socket, unsupervised).
    # Set after setegid, which clears it; then check the supervisor did not die before.
    if not die_with_parent(supervisor):
        raise StartupError("the supervising process is gone")
    handler = DkimMilter.handler
    keys = sum(len(k) for k in handler.keys.values())
    log.info(
        "milterd listening on %s (%d signing keys, sign=%s verify=%s, authserv-id %s)",
        address,
        keys,
        handler.sign_enabled,
        handler.verify_enabled,
        handler.server_id,
    )
    sys.stderr.flush()
    try:
        Milter.runmilter(MILTER_NAME, socket_spec(address), MTA_TIMEOUT)
    except Milter.milter.error as exc:
        # A stop that reaches libmilter while it is still starting up makes it fail
        # ("cannot run main"): that is the stop, not a listener that could not start.
        if not stop_asked.value:
            raise StartupError(f"cannot serve on {address}: {exc}") from None
        log.info("milterd listener on %s: stopped while starting (%s)", address, exc)
    # pymilter runs no callback once runmilter has returned: what is still in progress is cut,
    # and Postfix defers it (milter_default_action = tempfail).
    if DkimMilter.busy.value > 0:
        log.warning("%d messages cut by the stop; Postfix defers them", DkimMilter.busy.value)
    log.info("milterd listener on %s stopped", address)
