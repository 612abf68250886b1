"""The asyncio policy server: connections, requests, reload and the per-decision log line.

One task per connection reads, feeds the sans-IO decoder (policy_codec.py) and answers each
request in order; Postfix keeps connections open for many requests, so nothing is created
per request. A stalled or silent client only ever holds its own connection (every read has
a timeout). SIGTERM/SIGINT stop accepting, let in-flight requests finish and close;
SIGHUP reloads the config file (a bad file keeps the old config and logs why).

The sockets come bound (listeners.py), the store and checkers are built by wiring.py, and
supervisor.py runs one server per process.

Contract: docs/ARCHITECTURE.md, "What each daemon owns".
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from policyd.listeners import Listener
from policyd.lookup_maps import socketmap_handler
from policyd.mailbox_probe import MailboxProber
from policyd.metrics import Metrics, NullMetrics
from policyd.policy_codec import ProtocolViolation, RequestDecoder, encode_verdict
from policyd.wiring import build_checkers, load_live_lists, mailbox_prober_for, open_store_for
from postwarden.config import Config, ConfigError, load_config
from postwarden.daemon.log_lines import decision_line, flush_log_handlers, log_level
from postwarden.daemon.socket_files import LISTEN_BACKLOG
from postwarden.daemon.startup import StartupError
from postwarden.policy.live_lists import keep_lists_fresh
from postwarden.policy.pipeline import Pipeline
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Rule, Verdict, dunno
from postwarden.store.base import Store

log = logging.getLogger("postwarden.policyd")

READ_SIZE = 65536
# A request that started arriving must be complete within this time (Postfix writes a
# request in one go; a partial request that stops is a stalled or hostile client).
PARTIAL_REQUEST_TIMEOUT = 10.0
# A client that does not read its answers is dropped after this long.
WRITE_TIMEOUT = 10.0
# How often one housekeeping task flushes buffered log lines and closes idle or stalled
# connections (instead of a timeout around every read: ~12 µs a request each).
HOUSEKEEPING_INTERVAL = 0.1
# Extra time, after request_timeout, that shutdown waits for in-flight requests.
SHUTDOWN_GRACE = 2.0
# Log lines about refused connections (over max_connections) at most this often.
REFUSED_LOG_INTERVAL = 60.0

_BAD_REQUEST_REPLY = encode_verdict(dunno(Rule.BAD_REQUEST))
_BAD_REQUEST = dunno(Rule.BAD_REQUEST)


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
        lists = await load_live_lists(self.store)
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
        self.mailbox_prober = mailbox_prober_for(self.cfg)
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
        logging.getLogger().setLevel(log_level(cfg.policyd.log_level))
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
                # The decision lines go out before the answers: a daemon killed after
                # answering has logged what it answered (the buffer holds the lines of
                # this read only).
                flush_log_handlers()
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
            self._log_refused(time.monotonic())
            flush_log_handlers()
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
        self._log_refused(time.monotonic())
        self.metrics.error("max_connections")

    def _log_refused(self, now: float) -> None:
        """At most one line per REFUSED_LOG_INTERVAL, counting every refusal since the last.

        Also called by housekeeping, so the refusals of a last burst are reported too.
        """
        if self._refused and now - self._refused_logged >= REFUSED_LOG_INTERVAL:
            log.warning(
                "policyd: max_connections=%d reached, refused %d connection(s)",
                self.cfg.policyd.max_connections,
                self._refused,
            )
            self._refused_logged = now
            self._refused = 0

    def _log_decision(self, request: PolicyRequest, verdict: Verdict, elapsed: float) -> None:
        attrs = request.attributes
        # stage and instance join the lines of one message: at RCPT Postfix has no queue
        # id yet (NOQUEUE); the DATA-stage request of the same instance carries it.
        fields = (
            ("verdict", verdict.action.value),
            ("rule", verdict.rule.value),
            ("stage", attrs.get("protocol_state", "-")),
            ("instance", attrs.get("instance", "-")),
        )
        log.info(
            "%s",
            decision_line(
                "policyd",
                attrs.get("queue_id"),
                attrs.get("client_name", ""),
                attrs.get("client_address", ""),
                attrs.get("sender", ""),
                fields,
                elapsed * 1000.0,
                recipient=attrs.get("recipient", ""),
            ),
        )


def _store_kind(url: str) -> str:
    return url.partition("://")[0] or url
