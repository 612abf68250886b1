"""The asyncio policy server: sockets, connections, signals and worker processes.

One task per connection reads, feeds the sans-IO decoder and answers each request in
order; Postfix keeps connections open for many requests, so nothing is created per
request. A stalled or silent client only ever holds its own connection (every read has
a timeout). SIGTERM/SIGINT stop accepting, let in-flight requests finish and close;
SIGHUP reloads the config file (a bad file keeps the old config and logs why).

With `workers` > 1 the supervisor binds the sockets, forks the workers (each with its
own event loop and its own store connections, opened after the fork) and forwards
signals; a worker that dies is restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import grp
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path

from policyd.mailbox_probe import MailboxProber
from policyd.metrics import Metrics, NullMetrics
from policyd.protocol import ProtocolViolation, RequestDecoder, encode_verdict
from policyd.socketmap import socketmap_handler
from postwarden.config import Config, ConfigError, load_config
from postwarden.config.types import ListenAddress
from postwarden.daemon.socket_files import SocketInUseError, remove_stale_socket
from postwarden.dns.resolver import make_resolver
from postwarden.policy.dnsbl import DnsblChecker
from postwarden.policy.greylisting import LargeSenders, LargeSendersError, load_large_senders
from postwarden.policy.live_lists import LiveLists, keep_lists_fresh
from postwarden.policy.pipeline import Pipeline
from postwarden.policy.request import PolicyRequest
from postwarden.policy.spf_check import SpfChecker
from postwarden.policy.verdict import Rule, Verdict, dunno
from postwarden.store.base import Store, StoreError
from postwarden.syntax.untrusted_text import sanitise

log = logging.getLogger("postwarden.policyd")

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
READ_SIZE = 65536
# A request that started arriving must be complete within this time (Postfix writes a
# request in one go; a partial request that stops is a stalled or hostile client).
PARTIAL_REQUEST_TIMEOUT = 10.0
# A client that does not read its answers is dropped after this long.
WRITE_TIMEOUT = 10.0
# How often one housekeeping task flushes buffered log lines and closes idle or stalled
# connections (instead of a timeout around every read: ~12 µs a request each).
HOUSEKEEPING_INTERVAL = 0.1
# Buffered log lines are written at least this often, and at once from WARNING up.
LOG_FLUSH_INTERVAL = 0.1
LOG_BUFFER_LINES = 256
# Extra time, after request_timeout, that shutdown waits for in-flight requests.
SHUTDOWN_GRACE = 2.0
LISTEN_BACKLOG = 1024
# Log lines about refused connections (over max_connections) at most this often.
REFUSED_LOG_INTERVAL = 60.0
MAX_LOGGED_FIELD = 200
# A worker exits with this when it cannot start: restarting it would fail the same way.
EXIT_STARTUP_FAILED = 3

_BAD_REQUEST_REPLY = encode_verdict(dunno(Rule.BAD_REQUEST))
_BAD_REQUEST = dunno(Rule.BAD_REQUEST)


class StartupError(Exception):
    """The server cannot start (socket in use, bad permissions, store unusable)."""


@dataclass
class Listener:
    """A bound, listening socket and what it was made from."""

    address: ListenAddress
    sock: socket.socket
    # "policy" (check_policy_service) or "socketmap" (forwarding aliases, see socketmap.py).
    role: str = "policy"


def _log_level(name: str) -> int:
    return {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}.get(
        name, logging.ERROR
    )


class _LineFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(name)s[pid]: %(message)s`, cheaply.

    The date is formatted once per second, and the pid comes from a variable that a fork
    hook updates, not from os.getpid() per record (logging.logProcesses is off).
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._date = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        line = (
            f"{self._date},{int(record.msecs):03d} {record.levelname} {record.name}"
            f"[{_pid}]: {record.getMessage()}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class BufferedStderrHandler(logging.Handler):
    """Log lines to stderr in batches: one write() per LOG_FLUSH_INTERVAL, not per line.

    The per-decision INFO line is the hot path; a write syscall each costs as much as the
    rest of the line. WARNING and above are written at once; the server's housekeeping
    task flushes every HOUSEKEEPING_INTERVAL, and logging.shutdown() and fork() flush.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[str] = []
        self._flushed = time.time()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own contract: never raise from emit
            self.handleError(record)
            return
        if (
            record.levelno >= logging.WARNING
            or len(self._lines) >= LOG_BUFFER_LINES
            or record.created - self._flushed >= LOG_FLUSH_INTERVAL
        ):
            self._write()

    def flush(self) -> None:
        if self._lines:
            with self.lock or contextlib.nullcontext():
                self._write()

    def _write(self) -> None:
        lines, self._lines = self._lines, []
        self._flushed = time.time()
        if not lines:
            return
        # sys.stderr looked up each time: tests and daemons may replace it.
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()


_pid = os.getpid()


def _after_fork_in_child() -> None:
    global _pid  # the one process-wide fact the log format needs
    _pid = os.getpid()


def _flush_log_handlers() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()


# Lines buffered before a fork are written once, by the parent, not again by each child.
os.register_at_fork(before=_flush_log_handlers, after_in_child=_after_fork_in_child)


def setup_logging(level: str) -> None:
    """Timestamped lines on stderr (journald keeps them; `journalctl -t` greps them)."""
    handler = BufferedStderrHandler()
    handler.setFormatter(_LineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_log_level(level))
    # One line per decision is the hot path: skip what our format never prints (the
    # Logging HOWTO's "Optimization" section), about halving the cost of a record.
    logging._srcfile = None  # no caller frame lookup
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False  # the formatter knows the pid


# --- sockets -----------------------------------------------------------------------------


def _unix_socket(address: ListenAddress, mode: int, group: str | None) -> socket.socket:
    path = Path(address.path)
    try:
        remove_stale_socket(path)
    except SocketInUseError as exc:
        raise StartupError(str(exc)) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(LISTEN_BACKLOG)
    except KeyError:
        sock.close()
        raise StartupError(f"socket_group {group!r}: no such group") from None
    except OSError as exc:
        sock.close()
        raise StartupError(f"{path}: cannot listen: {exc.strerror}") from None
    return sock


def _inet_socket(address: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server(
            (address.host, address.port), family=family, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        raise StartupError(f"{address}: cannot listen: {exc.strerror}") from None


def bind_listeners(cfg: Config) -> list[Listener]:
    """Bind every `policyd.listen` address (before any fork, so workers share them)."""
    mode = int(cfg.policyd.socket_mode, 8)
    listeners: list[Listener] = []
    try:
        wanted = [(address, "policy") for address in cfg.policyd.listen]
        if cfg.policyd.aliases_listen is not None:
            wanted.append((cfg.policyd.aliases_listen, "socketmap"))
        for address, role in wanted:
            if address.kind == "unix":
                sock = _unix_socket(address, mode, cfg.policyd.socket_group)
            else:
                sock = _inet_socket(address)
            sock.setblocking(False)
            listeners.append(Listener(address, sock, role))
    except StartupError:
        close_listeners(listeners)
        raise
    return listeners


def close_listeners(listeners: Sequence[Listener]) -> None:
    for listener in listeners:
        listener.sock.close()
        if listener.address.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(listener.address.path)


# --- building the pipeline ---------------------------------------------------------------


def open_store_for(cfg: Config) -> Store:
    """The store, opened in the process that uses it (after any fork)."""
    from postwarden.store import open_store
    from postwarden.store.sqlite import SqliteStore

    try:
        store = open_store(cfg.store.url, timeout=cfg.store.timeout)
    except (StoreError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    if isinstance(store, SqliteStore):
        # Greylist writes batched every few ms: an autocommit per request cost more CPU
        # than the rest of the request, and workers queued on the file's write lock.
        store.enable_write_behind()
    return store


Checkers = tuple[DnsblChecker | None, SpfChecker | None, LargeSenders]


def build_checkers(cfg: Config) -> Checkers:
    """The DNSBL and SPF checkers and the large-senders list the config asks for."""
    dnsbl_checker: DnsblChecker | None = None
    spf_checker: SpfChecker | None = None
    if cfg.dnsbl.enabled:
        dnsbl_checker = DnsblChecker(cfg.dnsbl, make_resolver(cfg.dns))
    if cfg.spf.enabled:
        # The receiver= of Received-SPF names this host, as RFC 7208 section 9.1 suggests.
        spf_checker = SpfChecker(cfg.spf, cfg.dns, receiver=cfg.mail.hostname)
    try:
        large = load_large_senders(cfg.greylisting.large_senders_file)
    except LargeSendersError as exc:
        if spf_checker is not None:
            spf_checker.close()
        raise StartupError(f"greylisting.large_senders_file: {exc}") from None
    return dnsbl_checker, spf_checker, large


# --- the server --------------------------------------------------------------------------


class _Connection:
    __slots__ = ("busy", "decoder", "last_read", "task")

    def __init__(self, task: asyncio.Task[None] | None, now: float) -> None:
        self.task = task
        self.busy = False
        self.decoder = RequestDecoder()
        self.last_read = now  # loop.time() of the last data (housekeeping judges idleness)


class PolicyServer:
    """Serves policy requests on already-bound listeners until told to stop."""

    def __init__(
        self,
        cfg: Config,
        config_path: Path | None,
        listeners: Sequence[Listener],
        metrics: Metrics | NullMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.listeners = listeners
        self.metrics: Metrics | NullMetrics = metrics or NullMetrics()
        self.pipeline: Pipeline | None = None
        self.store: Store | None = None
        self._servers: list[asyncio.Server] = []
        self._connections: dict[int, _Connection] = {}
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._refused_logged = 0.0
        self._refused = 0
        self._log_decisions = True
        self.mailbox_prober: MailboxProber | None = None

    # -- lifecycle --
    async def start(self) -> None:
        self.store = open_store_for(self.cfg)
        lists = LiveLists()
        try:
            await lists.reload(self.store)
        except (StoreError, TimeoutError, OSError) as exc:
            log.warning("lists: store unreachable at start, starting with empty lists: %s", exc)
        dnsbl_checker, spf_checker, large = build_checkers(self.cfg)
        self.pipeline = Pipeline(self.cfg, self.store, lists, dnsbl_checker, spf_checker, large)
        self.pipeline.on_failure = self.metrics.error
        self._refresher = asyncio.create_task(
            keep_lists_fresh(lists, self.store, self.cfg.store.refresh_interval)
        )
        self._housekeeper = asyncio.create_task(self._housekeeping())
        if self._stopped is None:
            self._stopped = asyncio.Event()
        self._apply_log_level(self.cfg)
        if self.cfg.policyd.mailbox_lmtp is not None:
            # One prober (its own pooled LMTP connections) per worker, made after the fork.
            self.mailbox_prober = MailboxProber(self.cfg.policyd.mailbox_lmtp)
        aliases = socketmap_handler(self.store, self.mailbox_prober, self.cfg.mail.local_domains)
        for listener in self.listeners:
            handler = self._serve_connection if listener.role == "policy" else aliases
            # backlog again here: asyncio re-listens on the socket with its default of 100,
            # too few when hundreds of smtpd processes connect at once.
            if listener.address.kind == "unix":
                server = await asyncio.start_unix_server(
                    handler, sock=listener.sock, limit=READ_SIZE, backlog=LISTEN_BACKLOG
                )
            else:
                server = await asyncio.start_server(
                    handler, sock=listener.sock, limit=READ_SIZE, backlog=LISTEN_BACKLOG
                )
            self._servers.append(server)
        # Everything built so far (config, lists, checkers) lives as long as the process:
        # moving it out of the collector's generations keeps GC pauses, and so p99, short.
        gc.freeze()
        log.info(
            "policyd: listening on %s (store %s)",
            ", ".join(f"{li.address} ({li.role})" for li in self.listeners),
            _store_kind(self.cfg.store.url),
        )

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down cleanly."""
        # Handlers first: a signal during start-up must not kill the process half-way.
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await self._stopped.wait()
        await self.shutdown()

    def request_stop(self) -> None:
        if self._stopped is not None and not self._stopped.is_set():
            log.info("policyd: stopping: finishing in-flight requests")
            self._stopped.set()

    async def shutdown(self) -> None:
        self._stopping = True
        for server in self._servers:
            server.close()
        # Idle connections are closed now; busy ones finish their request first.
        for conn in list(self._connections.values()):
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        deadline = self.cfg.policyd.request_timeout + SHUTDOWN_GRACE
        tasks = [c.task for c in self._connections.values() if c.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=deadline)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for task in (self._refresher, self._housekeeper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.pipeline is not None and self.pipeline.spf is not None:
            self.pipeline.spf.close()
        if self.mailbox_prober is not None:
            await self.mailbox_prober.close()
        if self.store is not None:
            try:
                await self.store.close()
            except Exception as exc:  # noqa: BLE001 - closing must not stop the shutdown
                log.warning("policyd: closing the store failed: %s", exc)
        log.info("policyd: stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the config file; a bad one keeps the running config."""
        if self.pipeline is None:
            log.warning("policyd: SIGHUP during start-up ignored: the config is being loaded")
            return
        try:
            new = load_config(self.config_path, missing_ok=self.config_path is None)
            dnsbl_checker, spf_checker, large = build_checkers(new)
        except (ConfigError, StartupError) as exc:
            log.error("policyd: reload failed, keeping the running config: %s", exc)
            return
        except Exception:
            log.exception("policyd: reload failed unexpectedly, keeping the running config")
            return
        old = self.cfg
        restart_keys = (
            "listen",
            "aliases_listen",
            "mailbox_lmtp",
            "workers",
            "metrics_listen",
            "socket_mode",
            "socket_group",
        )
        for key in restart_keys:
            if getattr(old.policyd, key) != getattr(new.policyd, key):
                log.warning("policyd: reload: policyd.%s changes need a restart", key)
        if old.store != new.store:
            log.warning("policyd: reload: [store] changes need a restart")
        self.cfg = new
        old_spf = self.pipeline.spf
        self.pipeline.configure(new, dnsbl_checker, spf_checker, large)
        if old_spf is not None:
            old_spf.close()  # its threads end once any lookup still running is done
        self._apply_log_level(new)
        log.info("policyd: config reloaded from %s", self.config_path)

    def _apply_log_level(self, cfg: Config) -> None:
        logging.getLogger().setLevel(_log_level(cfg.policyd.log_level))
        self._log_decisions = log.isEnabledFor(logging.INFO)

    # -- connections --
    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._stopping or len(self._connections) >= self.cfg.policyd.max_connections:
            self._refuse_connection()
            writer.close()
            return
        conn = _Connection(asyncio.current_task(), asyncio.get_running_loop().time())
        key = id(conn)
        self._connections[key] = conn
        try:
            await self._converse(reader, writer, conn)
        except asyncio.CancelledError:
            pass  # shutdown closes idle connections
        except (ConnectionError, OSError) as exc:
            log.debug("policyd: connection dropped: %s", exc)
        except Exception:
            log.exception("policyd: connection handler failed")
        finally:
            del self._connections[key]
            writer.close()

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Connection
    ) -> None:
        # Idle and stalled clients are closed by _housekeeping (it cancels this task).
        decoder = conn.decoder
        pipeline = self.pipeline
        assert pipeline is not None
        loop = asyncio.get_running_loop()
        transport = writer.transport
        # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
        clock = time.perf_counter
        while not self._stopping:
            data = await reader.read(READ_SIZE)
            if not data:
                return
            conn.last_read = loop.time()
            results = decoder.feed(data)
            if not results:
                continue
            conn.busy = True
            replies: list[bytes] = []
            close = False
            for result in results:
                if isinstance(result, PolicyRequest):
                    started = clock()
                    verdict = await pipeline.evaluate(result)
                    elapsed = clock() - started
                    replies.append(encode_verdict(verdict))
                    self.metrics.decision(verdict, elapsed)
                    if self._log_decisions:
                        self._log_decision(result, verdict, elapsed)
                else:
                    close = self._protocol_error(result)
                    if close:
                        break
                    replies.append(_BAD_REQUEST_REPLY)
            if replies:
                writer.write(b"".join(replies))
                # Usually the kernel took it all at once: nothing to wait for.
                if transport.get_write_buffer_size():
                    try:
                        async with asyncio.timeout(WRITE_TIMEOUT):
                            await writer.drain()
                    except TimeoutError:
                        log.warning("policyd: client does not read its answers, closing")
                        return
            conn.busy = False
            if close:
                return

    async def _housekeeping(self) -> None:
        """Flush buffered log lines; close idle connections and clients stalled mid-request."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            _flush_log_handlers()
            idle_timeout = self.cfg.policyd.idle_timeout
            partial_timeout = min(idle_timeout, PARTIAL_REQUEST_TIMEOUT)
            now = loop.time()
            for conn in list(self._connections.values()):
                if conn.busy or conn.task is None:
                    continue  # a request in progress is bounded by request_timeout
                stalled = conn.decoder.pending
                if now - conn.last_read < (partial_timeout if stalled else idle_timeout):
                    continue
                if stalled:
                    log.warning("policyd: client stalled mid-request, closing the connection")
                    self.metrics.error("stalled")
                conn.task.cancel()

    def _protocol_error(self, error: ProtocolViolation) -> bool:
        """Log a bad request; return True when the connection must be closed."""
        kind = type(error).__name__
        self.metrics.error(f"protocol_{kind}")
        if error.fatal:
            log.warning("policyd: bad request (%s): %s; closing the connection", kind, error)
            return True
        log.warning("policyd: bad request (%s): %s; answering DUNNO", kind, error)
        self.metrics.decision(_BAD_REQUEST, 0.0)
        return False

    def _refuse_connection(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_LOG_INTERVAL:
            log.warning(
                "policyd: max_connections=%d reached, refused %d connection(s)",
                self.cfg.policyd.max_connections,
                self._refused,
            )
            self._refused_logged = now
            self._refused = 0
        self.metrics.error("max_connections")

    def _log_decision(self, request: PolicyRequest, verdict: Verdict, elapsed: float) -> None:
        attrs = request.attributes
        log.info(
            "policyd: %s: client=%s[%s], from=<%s>, to=<%s>, verdict=%s, rule=%s, ms=%.2f",
            sanitise(attrs.get("queue_id") or "NOQUEUE", MAX_LOGGED_FIELD),
            sanitise(attrs.get("client_name", ""), MAX_LOGGED_FIELD),
            sanitise(attrs.get("client_address", ""), MAX_LOGGED_FIELD),
            sanitise(attrs.get("sender", ""), MAX_LOGGED_FIELD),
            sanitise(attrs.get("recipient", ""), MAX_LOGGED_FIELD),
            verdict.action.value,
            verdict.rule.value,
            elapsed * 1000.0,
        )


def _store_kind(url: str) -> str:
    return url.partition("://")[0] or url


# --- running: one process, or a supervisor with workers ----------------------------------


def worker_count(cfg: Config, override: int | None) -> int:
    wanted = cfg.policyd.workers if override is None else override
    return wanted if wanted > 0 else (os.cpu_count() or 1)


def _serve_in_this_process(
    cfg: Config, config_path: Path | None, listeners: Sequence[Listener], metrics_thread: bool
) -> int:
    metrics: Metrics | NullMetrics = NullMetrics()
    if cfg.policyd.metrics_listen is not None:
        from policyd.metrics import create_metrics, serve_in_thread

        metrics = create_metrics()
        if metrics_thread:
            try:
                serve_in_thread(cfg.policyd.metrics_listen)
            except OSError as exc:
                log.error("policyd: metrics on %s: %s", cfg.policyd.metrics_listen, exc.strerror)
                return 1
    server = PolicyServer(cfg, config_path, listeners, metrics)
    try:
        _run_event_loop(server.run())
    except StartupError as exc:
        log.error("policyd: cannot start: %s", exc)
        return EXIT_STARTUP_FAILED
    return 0


def _run_event_loop(main: Coroutine[object, object, None]) -> None:
    """Run `main` on uvloop when it is installed (about twice the requests per CPU second
    of the stock loop for this small-message workload), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def run(cfg: Config, config_path: Path | None, workers: int | None = None) -> int:
    """Run the policy server until SIGTERM; return the process exit code."""
    setup_logging(cfg.policyd.log_level)
    try:
        listeners = bind_listeners(cfg)
    except StartupError as exc:
        log.error("policyd: cannot start: %s", exc)
        return 1
    try:
        count = worker_count(cfg, workers)
        if count == 1:
            code = _serve_in_this_process(cfg, config_path, listeners, metrics_thread=True)
            return 1 if code == EXIT_STARTUP_FAILED else code
        try:
            # Open (and create) the store once before forking: a bad store is one clear
            # error instead of N, and workers do not race to create a new SQLite file.
            # Closed again at once: every worker opens its own connections after the fork.
            asyncio.run(open_store_for(cfg).close())
        except StartupError as exc:
            log.error("policyd: cannot start: %s", exc)
            return 1
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
        metrics_dir: tempfile.TemporaryDirectory[str] | None = None
        if self.cfg.policyd.metrics_listen is not None:
            from policyd.metrics import MULTIPROC_ENV

            # Chosen before any worker imports prometheus_client (see policyd.metrics).
            metrics_dir = tempfile.TemporaryDirectory(prefix="postwarden-metrics-")
            os.environ[MULTIPROC_ENV] = metrics_dir.name
        previous = {sig: signal.signal(sig, self._on_signal) for sig in HANDLED_SIGNALS}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_signal)
        try:
            if metrics_dir is not None:
                self.metrics_pid = self._fork(self._metrics_main)
            for slot in range(self.count):
                self.workers[self._fork(self._worker_main)] = slot
            log.info("policyd: supervisor running %d workers", self.count)
            return self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if metrics_dir is not None:
                metrics_dir.cleanup()
                os.environ.pop(MULTIPROC_ENV, None)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _fork(self, main: Callable[[], int]) -> int:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
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
        from policyd.metrics import serve_multiprocess_forever

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
        return 1 if self._failed else 0

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
            from policyd.metrics import mark_worker_dead

            mark_worker_dead(pid)
            if stopping:
                continue
            if code == EXIT_STARTUP_FAILED:
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
