"""How a daemon that cannot start says so: one line, no traceback, exit code 1."""

from __future__ import annotations

import logging

import pytest

from postwarden.daemon.startup import (
    EXIT_BAD_CONFIG,
    EXIT_STARTUP_FAILED,
    StartupError,
    log_startup_failure,
)


def test_a_startup_failure_is_one_error_line_and_exit_1(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("postwarden.test")
    with caplog.at_level(logging.ERROR, logger="postwarden.test"):
        code = log_startup_failure(log, "milterd", StartupError("/run/x.sock: in use"))
    assert code == EXIT_STARTUP_FAILED == 1
    [record] = caplog.records
    assert record.getMessage() == "milterd: cannot start: /run/x.sock: in use"
    assert record.exc_info is None  # an expected failure shows no traceback


def test_a_bad_config_has_its_own_exit_code() -> None:
    assert EXIT_BAD_CONFIG == 2 != EXIT_STARTUP_FAILED
