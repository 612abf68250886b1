"""A listener's runmilter failing: a start-up failure, unless its stop was asked for first.

libmilter stopped by a SIGTERM while it is still starting up makes runmilter fail ("cannot
run main"); logged as "cannot start", that was a false alarm on every stop racing a start.
"""

from __future__ import annotations

import ctypes
import logging
import os
from types import SimpleNamespace

import Milter
import pytest

from milterd import listener_processes
from milterd.milter import DkimMilter
from postwarden.config.types import ListenAddress
from postwarden.daemon.startup import StartupError
from tests.fixtures.mail_system import make_test_config


@pytest.fixture
def failing_runmilter(monkeypatch: pytest.MonkeyPatch) -> None:
    def runmilter(name: str, spec: str, timeout: int) -> None:
        raise Milter.milter.error("cannot run main")

    monkeypatch.setattr(Milter, "runmilter", runmilter)
    handler = SimpleNamespace(keys={}, sign_enabled=True, verify_enabled=True, server_id="x")
    monkeypatch.setattr(DkimMilter, "handler", handler, raising=False)
    monkeypatch.setattr(DkimMilter, "busy", ctypes.c_int64(0))


def _listen(stop_asked: int) -> None:
    address = ListenAddress("inet", host="127.0.0.1", port=1)
    listener_processes._listen(
        make_test_config(), address, os.getppid(), ctypes.c_int64(stop_asked)
    )


def test_runmilter_failing_with_no_stop_asked_is_a_startup_error(failing_runmilter: None) -> None:
    with pytest.raises(StartupError, match=r"cannot serve on .*: cannot run main"):
        _listen(stop_asked=0)


def test_runmilter_failing_after_the_stop_was_asked_is_the_stop(
    failing_runmilter: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _listen(stop_asked=1)
    assert "stopped while starting" in caplog.text
