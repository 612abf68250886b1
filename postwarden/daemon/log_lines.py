"""The log lines of both daemons: one format, one per decision, written cheaply.

Every line is `%date %LEVEL postwarden.<daemon>[pid]: <message>` on stderr (journald or the
appliance's log files keep it), and every decision or message is one `decision_line()` at
INFO (docs/ARCHITECTURE.md, "Log lines").
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from postwarden.syntax.untrusted_text import sanitise

# Buffered log lines are written at least this often, and at once from WARNING up.
LOG_FLUSH_INTERVAL = 0.1
LOG_BUFFER_LINES = 256
# Longest untrusted value (sender, client name, ...) in a log line.
MAX_LOGGED_FIELD = 200


def log_level(name: str) -> int:
    """The logging level of a `log_level` config value."""
    return {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}.get(
        name, logging.ERROR
    )


def decision_line(
    daemon: str,
    queue_id: str | None,
    client_name: str,
    client_address: str,
    sender: str,
    fields: tuple[tuple[str, str], ...],
    ms: float,
    *,
    recipient: str | None = None,
) -> str:
    """`<daemon>: QID: client=name[ip], from=<sender>[, to=<rcpt>], k=v, ..., ms=0.42`.

    In Postfix's style, so log tools that read Postfix's lines read these. Every value is
    sanitised (one line, printable, bounded): a CR or LF in a sender cannot forge a line.
    `fields` are logged in their order; an empty queue id is NOQUEUE.
    """
    parts = [
        f"{daemon}: {sanitise(queue_id or 'NOQUEUE', MAX_LOGGED_FIELD)}: "
        f"client={sanitise(client_name, MAX_LOGGED_FIELD)}"
        f"[{sanitise(client_address, MAX_LOGGED_FIELD)}]",
        f"from=<{sanitise(sender, MAX_LOGGED_FIELD)}>",
    ]
    if recipient is not None:
        parts.append(f"to=<{sanitise(recipient, MAX_LOGGED_FIELD)}>")
    parts.extend(f"{name}={sanitise(value, MAX_LOGGED_FIELD)}" for name, value in fields)
    parts.append(f"ms={ms:.2f}")
    return ", ".join(parts)


class LineFormatter(logging.Formatter):
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
    rest of the line. WARNING and above are written at once; a daemon's housekeeping calls
    flush_log_handlers() often, and logging.shutdown() and fork() flush.
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


def flush_log_handlers() -> None:
    """Write what the root logger's handlers buffered."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()


# Lines buffered before a fork are written once, by the parent, not again by each child.
os.register_at_fork(before=flush_log_handlers, after_in_child=_after_fork_in_child)


def setup_logging(level: str, *, buffered: bool = True) -> None:
    """Timestamped lines on stderr (journald keeps them; `journalctl -t` greps them).

    `buffered=False` writes every line at once: for a daemon (milterd) with no housekeeping
    task that would flush a batch.
    """
    handler: logging.Handler = BufferedStderrHandler() if buffered else logging.StreamHandler()
    handler.setFormatter(LineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level(level))
    # One line per decision is the hot path: skip what our format never prints (the
    # Logging HOWTO's "Optimization" section), about halving the cost of a record.
    logging._srcfile = None  # no caller frame lookup
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False  # the formatter knows the pid
