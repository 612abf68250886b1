"""How policyd runs: one process, or a pre-fork supervisor with worker processes.

With `workers` > 1 the supervisor binds the sockets, forks the workers (each with its own
event loop and its own store connections, opened after the fork) and forwards signals; a
worker that dies is restarted, one that cannot start stops them all (it would fail again).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from policyd.listeners import Listener, Served, bind_listeners, close_listeners
from policyd.metrics import Metrics, NullMetrics
from policyd.server import PolicyServer
from policyd.wiring import open_store_for
from postwarden.config import Config, ConfigError, load_config
from postwarden.daemon.child_processes import die_with_parent
from postwarden.daemon.log_lines import setup_logging
from postwarden.daemon.metrics_http import (
    mark_process_dead,
    multiprocess_directory,
    serve_in_thread,
    serve_multiprocess_forever,
)
from postwarden.daemon.startup import (
    EXIT_CHILD_STARTUP_FAILED,
    EXIT_OK,
    EXIT_STARTUP_FAILED,
    HANDLED_SIGNALS,
    StartupError,
    log_startup_failure,
    run_event_loop,
)

log = logging.getLogger("postwarden.policyd")


def worker_count(cfg: Config, override: int | None) -> int:
    """The number of worker processes: the override, else policyd.workers (0: one per CPU)."""
    wanted = cfg.policyd.workers if override is None else override
    return wanted if wanted > 0 else (os.cpu_count() or 1)


def _serve_in_this_process(
    cfg: Config,
    config_path: Path | None,
    listeners: Sequence[Listener],
    metrics_thread: bool,
    with_metrics: bool = True,
) -> int:
    metrics: Metrics | NullMetrics = NullMetrics()
    if with_metrics and cfg.policyd.metrics_listen is not None:
        from policyd.metrics import create_metrics

        metrics = create_metrics()
        if metrics_thread:
            try:
                serve_in_thread(cfg.policyd.metrics_listen)
            except OSError as exc:
                log.error("policyd: metrics on %s: %s", cfg.policyd.metrics_listen, exc.strerror)
                return 1
    server = PolicyServer(cfg, config_path, listeners, metrics)
    try:
        run_event_loop(server.run())
    except StartupError as exc:
        log_startup_failure(log, "policyd", exc)
        return EXIT_CHILD_STARTUP_FAILED
    return EXIT_OK


def run(
    cfg: Config, config_path: Path | None, workers: int | None = None, served: Served = "all"
) -> int:
    """Run the policy server (or mapd, `served="maps"`) until SIGTERM; the exit code."""
    setup_logging(cfg.policyd.log_level)
    try:
        listeners = bind_listeners(cfg, served)
    except StartupError as exc:
        return log_startup_failure(log, "mapd" if served == "maps" else "policyd", exc)
    if served == "maps" and not listeners:
        # The appliance runs mapd always; a config without the maps leaves it nothing to do.
        log.warning("mapd: policyd.aliases_listen is not set: no map to serve; idle until stopped")
        stops = {signal.SIGTERM, signal.SIGINT}
        signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        signal.sigwait(stops)
        return EXIT_OK
    try:
        if served == "maps":
            # One process: a lookup is a store read; policyd's metrics port is policyd's.
            code = _serve_in_this_process(
                cfg, config_path, listeners, metrics_thread=False, with_metrics=False
            )
            return EXIT_STARTUP_FAILED if code == EXIT_CHILD_STARTUP_FAILED else code
        count = worker_count(cfg, workers)
        if count == 1:
            code = _serve_in_this_process(cfg, config_path, listeners, metrics_thread=True)
            return EXIT_STARTUP_FAILED if code == EXIT_CHILD_STARTUP_FAILED else code
        try:
            # Open (and create) the store once before forking: a bad store is one clear
            # error instead of N, and workers do not race to create a new SQLite file.
            # Closed again at once: every worker opens its own connections after the fork.
            asyncio.run(open_store_for(cfg).close())
        except StartupError as exc:
            return log_startup_failure(log, "policyd", exc)
        return Supervisor(cfg, config_path, listeners, count).run()
    finally:
        close_listeners(listeners)


class Supervisor:
    """Forks the workers on shared sockets, forwards signals, restarts dead workers."""

    RESTART_BACKOFF = 1.0  # seconds between restarts of a worker that keeps dying

    def __init__(
        self, cfg: Config, config_path: Path | None, listeners: Sequence[Listener], count: int
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.listeners = listeners
        self.count = count
        self.workers: dict[int, int] = {}  # pid -> slot
        self.metrics_pid: int | None = None
        self._signals: list[int] = []
        self._failed = False

    def run(self) -> int:
        # Chosen before any worker imports prometheus_client (see metrics_http).
        metrics_dir: AbstractContextManager[object] = (
            nullcontext() if self.cfg.policyd.metrics_listen is None else multiprocess_directory()
        )
        with metrics_dir:
            return self._run()

    def _run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_signal)
        try:
            if self.cfg.policyd.metrics_listen is not None:
                self.metrics_pid = self._fork(self._metrics_main)
            for slot in range(self.count):
                self.workers[self._fork(self._worker_main)] = slot
            log.info("policyd: supervisor running %d workers", self.count)
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _fork(self, main: Callable[[], int]) -> int:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # A worker left behind by a killed supervisor would hold the sockets.
                if not die_with_parent(parent):
                    os._exit(EXIT_CHILD_STARTUP_FAILED)
                for sig in (*HANDLED_SIGNALS, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                # Until the worker's loop handles it, a forwarded SIGHUP must not kill it;
                # it reads the newest config at start anyway.
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                code = main()
            except BaseException:  # a forked child must never unwind into the parent's code
                log.exception("policyd: worker failed")
            finally:
                logging.shutdown()
                os._exit(code)
        return pid

    def _worker_main(self) -> int:
        return _serve_in_this_process(
            self.cfg, self.config_path, self.listeners, metrics_thread=False
        )

    def _metrics_main(self) -> int:
        for listener in self.listeners:
            listener.sock.close()
        assert self.cfg.policyd.metrics_listen is not None
        try:
            serve_multiprocess_forever(self.cfg.policyd.metrics_listen)
        except OSError as exc:
            log.error("policyd: metrics on %s: %s", self.cfg.policyd.metrics_listen, exc.strerror)
            return 1
        return 0

    def _supervise(self) -> int:
        stopping = False
        deaths: dict[int, float] = {}
        self._failed = False
        while self.workers or (self.metrics_pid is not None and stopping):
            if self._failed and not stopping:
                stopping = True
                self._broadcast(signal.SIGTERM)
                if self.metrics_pid is not None:
                    _kill(self.metrics_pid, signal.SIGTERM)
            while self._signals:
                sig = self._signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT) and not stopping:
                    stopping = True
                    log.info("policyd: stopping %d workers", len(self.workers))
                    self._broadcast(signal.SIGTERM)
                    if self.metrics_pid is not None:
                        _kill(self.metrics_pid, signal.SIGTERM)
                elif sig == signal.SIGHUP and not stopping:
                    self._reload()
            self._reap(stopping, deaths)
            if stopping and not self.workers and self.metrics_pid is None:
                break
            time.sleep(0.05)
        return EXIT_STARTUP_FAILED if self._failed else EXIT_OK

    def _broadcast(self, sig: int) -> None:
        for pid in self.workers:
            _kill(pid, sig)

    def _reload(self) -> None:
        try:
            new = load_config(self.config_path, missing_ok=self.config_path is None)
        except ConfigError as exc:
            log.error("policyd: reload failed, keeping the running config: %s", exc)
            return
        # Workers forked from now on start with the new config; running ones reload too.
        self.cfg = new
        self._broadcast(signal.SIGHUP)

    def _reap(self, stopping: bool, deaths: dict[int, float]) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid == self.metrics_pid:
                self.metrics_pid = None
                if not stopping:
                    log.error("policyd: metrics process exited (%d), restarting it", code)
                    time.sleep(self.RESTART_BACKOFF)
                    self.metrics_pid = self._fork(self._metrics_main)
                continue
            slot = self.workers.pop(pid, None)
            if slot is None:
                continue
            mark_process_dead(pid)
            if stopping:
                continue
            if code == EXIT_CHILD_STARTUP_FAILED:
                log.error("policyd: a worker could not start; stopping")
                self._failed = True
                continue
            log.error("policyd: worker %d exited (%d), restarting it", pid, code)
            if time.monotonic() - deaths.get(slot, 0.0) < 10 * self.RESTART_BACKOFF:
                time.sleep(self.RESTART_BACKOFF)  # a worker dying at once must not spin
            deaths[slot] = time.monotonic()
            self.workers[self._fork(self._worker_main)] = slot


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
