"""How a daemon that cannot start says so: one exception, one log line, one exit code.

Shared by policyd and milterd (docs/ARCHITECTURE.md, "Runtime conventions"): a bad config
is refused by the CLI before a daemon runs (EXIT_BAD_CONFIG); what fails after that (a
socket in use, a group that does not exist, a store that cannot be opened) is a
StartupError, logged as `<daemon>: cannot start: <reason>` without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine

EXIT_OK = 0
# A start-up failure (socket in use, bad permissions, store unusable): one log line.
EXIT_STARTUP_FAILED = 1
# The config file is invalid (the CLI says file, key and reason).
EXIT_BAD_CONFIG = 2
# A worker or listener process exits with this when it cannot start: its supervisor does
# not restart it (it would fail the same way) but stops, exiting EXIT_STARTUP_FAILED.
EXIT_CHILD_STARTUP_FAILED = 3

# SIGTERM/SIGINT: finish what is in flight, then exit 0. SIGHUP: reload what can be.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP
HANDLED_SIGNALS = (*STOP_SIGNALS, RELOAD_SIGNAL)


class StartupError(Exception):
    """The daemon cannot start as configured (socket in use, bad permissions, store unusable)."""


def log_startup_failure(log: logging.Logger, daemon: str, error: StartupError) -> int:
    """Log the one line a start-up failure gets; return the exit code for it."""
    log.error("%s: cannot start: %s", daemon, error)
    return EXIT_STARTUP_FAILED


def run_event_loop(main: Coroutine[object, object, None]) -> None:
    """Run `main` on uvloop when it is installed (about twice the requests per CPU second
    of the stock loop for this small-message workload), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
