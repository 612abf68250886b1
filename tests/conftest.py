"""Shared pytest wiring: each real component's fixture lives in its own tests/fixtures module."""

import pytest

pytest_plugins = [
    "tests.fixtures.log_guard",
    "tests.fixtures.redis_server",
    "tests.fixtures.dns_server",
    "tests.fixtures.policyd_daemon",
    "tests.fixtures.milterd_daemon",
    "tests.fixtures.netns",
    "tests.fixtures.mail_system",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "expect_log(*regexes): the daemons may log these tracebacks or errors "
        "(tests/fixtures/log_guard.py)",
    )
