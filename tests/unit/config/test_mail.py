"""The [mail] table (config/mail.py): a value Postfix or Dovecot cannot carry is refused.

Each refusal names the reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from postwarden.config.loading import ConfigError
from tests.unit.config.config_files import mail_config


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ("example.com", "must look like"),
        ("example.com|", "must look like"),
        ("bad domain|10.0.0.1", "not a domain name"),
        ("inside.example.com|10.0.0.1:99999", "port must be"),
    ],
)
def test_bad_relay_domain_is_refused_with_the_reason(entry: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        mail_config(relay_domains=[entry])


def test_relay_domain_may_not_also_be_local() -> None:
    with pytest.raises(ConfigError, match="either stored here or relayed"):
        mail_config(relay_domains=["example.com|10.0.0.1"])


def test_duplicate_ports_are_refused() -> None:
    with pytest.raises(ConfigError, match="already used"):
        mail_config(submission_port=25)


def test_submission_needs_sasl() -> None:
    with pytest.raises(ConfigError, match="need sasl"):
        mail_config(sasl=False)


@pytest.mark.parametrize(
    ("relays", "why"),
    [
        (
            [{"name": "a", "host": "h.example"}, {"name": "b", "host": "i.example"}],
            "only one relay",
        ),
        (
            [
                {"name": "a", "host": "h.example"},
                {"name": "a", "host": "h.example", "sender_domains": ["x.test"]},
            ],
            "used twice",
        ),
        ([{"name": "a", "host": "h.example", "username": "u"}], "together"),
        (
            [{"name": "a", "host": "h.example", "protocol": "smtps", "starttls": "required"}],
            "does not apply",
        ),
        ([{"name": "a", "host": "h.example", "protocol": "smtp-ssl"}], "protocol"),
    ],
)
def test_bad_relays_are_refused_with_the_reason(relays: list[dict[str, Any]], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        mail_config(relays=relays)


@pytest.mark.parametrize("entry", ["192.*.1.1", "1*.2.3.4", "not-an-ip", "300.1.1.1"])
def test_bad_connection_control_entries_are_refused(entry: str) -> None:
    with pytest.raises(ConfigError, match=r"connection_control\.addresses"):
        mail_config(connection_control={"addresses": [entry]})
