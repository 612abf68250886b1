"""The one log format of both daemons: the decision line and the line formatter."""

from __future__ import annotations

import io
import logging
import re

import pytest

from postwarden.daemon.log_lines import (
    MAX_LOGGED_FIELD,
    BufferedStderrHandler,
    LineFormatter,
    decision_line,
    log_level,
)
from postwarden.syntax.untrusted_text import sanitise


def test_policyd_decision_line_keeps_its_field_order() -> None:
    line = decision_line(
        "policyd",
        "4Bf3xY1z2Qz9",
        "mail.example.org",
        "192.0.2.10",
        "alice@example.org",
        (("verdict", "DEFER_IF_PERMIT"), ("rule", "greylist_defer")),
        0.4249,
        recipient="bob@example.com",
    )
    assert line == (
        "policyd: 4Bf3xY1z2Qz9: client=mail.example.org[192.0.2.10], "
        "from=<alice@example.org>, to=<bob@example.com>, "
        "verdict=DEFER_IF_PERMIT, rule=greylist_defer, ms=0.42"
    )


def test_a_line_without_recipient_or_queue_id() -> None:
    line = decision_line("milterd", "", "unknown", "local", "", (("dkim", "signed"),), 12.0)
    assert line == "milterd: NOQUEUE: client=unknown[local], from=<>, dkim=signed, ms=12.00"


@pytest.mark.parametrize("hostile", ["a\r\nb", "a\nb", "a\rb", "a\x00b", "a\x1b[31mb"])
def test_untrusted_values_cannot_forge_a_line(hostile: str) -> None:
    line = decision_line(
        "policyd",
        hostile,
        hostile,
        hostile,
        hostile,
        (("login", hostile),),
        1.0,
        recipient=hostile,
    )
    assert "\r" not in line and "\n" not in line and "\x00" not in line and "\x1b" not in line
    clean = sanitise(hostile, MAX_LOGGED_FIELD)
    assert line == (
        f"policyd: {clean}: client={clean}[{clean}], from=<{clean}>, to=<{clean}>, "
        f"login={clean}, ms=1.00"
    )


def test_long_untrusted_values_are_bounded() -> None:
    line = decision_line("policyd", "Q", "n", "ip", "x" * 10_000, (), 0.0)
    assert len(line) < MAX_LOGGED_FIELD + 100


def test_formatter_prints_date_level_logger_and_pid() -> None:
    record = logging.LogRecord(
        "postwarden.milterd", logging.INFO, __file__, 1, "hi %s", ("x",), None
    )
    text = LineFormatter().format(record)
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO postwarden\.milterd\[\d+\]: hi x", text
    ), text


def test_buffered_handler_writes_warnings_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    handler = BufferedStderrHandler()
    handler.setFormatter(LineFormatter())
    info = logging.LogRecord("postwarden.policyd", logging.INFO, __file__, 1, "one", (), None)
    info.created = handler._flushed  # same instant: stays buffered
    handler.emit(info)
    assert stderr.getvalue() == ""
    warning = logging.LogRecord("postwarden.policyd", logging.WARNING, __file__, 1, "two", (), None)
    warning.created = handler._flushed
    handler.emit(warning)
    lines = stderr.getvalue().splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["one", "two"]


def test_log_level_names() -> None:
    assert [log_level(n) for n in ("debug", "info", "warning", "error")] == [
        logging.DEBUG,
        logging.INFO,
        logging.WARNING,
        logging.ERROR,
    ]
