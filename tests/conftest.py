"""Shared pytest wiring: each real component's fixture lives in its own tests/fixtures module."""

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.dns_server",
    "tests.fixtures.policyd_daemon",
    "tests.fixtures.milterd_daemon",
    "tests.fixtures.netns",
    "tests.fixtures.mail_system",
]
