"""Settings that reopen a hole: each rule names its key; the open relay is refused by the model."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from postwarden.config import Config, ConfigError, parse_config
from postwarden.config.hazards import (
    Hazard,
    config_hazards,
    open_relay_networks,
)
from postwarden.config.mail import MailConfig
from postwarden.config.model import NetworkConfig

RELAY = {"name": "provider", "host": "smtp.example.net", "username": "u", "password_file": "/p"}

# (config, key of the one warning it gives)
WARNED: list[tuple[dict[str, Any], str]] = [
    ({"mail": {"smuggling_protection": False}}, "mail.smuggling_protection"),
    ({"mail": {"reject_forged_local_senders": False}}, "mail.reject_forged_local_senders"),
    ({"mail": {"imap_pop3_require_tls": False}}, "mail.imap_pop3_require_tls"),
    (
        {"mail": {"imap_pop3_require_tls": False, "imap": False, "pop3": True}},
        "mail.imap_pop3_require_tls",
    ),
    ({"mail": {"auth_rate_limit": 0}}, "mail.auth_rate_limit"),
    ({"milterd": {"from_mismatch": "unsigned"}}, "milterd.from_mismatch"),
    ({"policyd": {"unreachable_action": "DUNNO"}}, "policyd.unreachable_action"),
    ({"mail": {"max_connections": 2000}}, "policyd.max_connections"),
    ({"policyd": {"max_connections": 99}}, "policyd.max_connections"),
    ({"network": {"trusted": ["127.0.0.0/8", "198.51.100.0/24"]}}, "network.trusted"),
    ({"network": {"trusted": ["2001:db8:1::/48"]}}, "network.trusted"),
    ({"network": {"trusted": ["203.0.113.0/16"]}}, "network.trusted"),  # /16: the widest warned
    ({"network": {"trusted": ["::ffff:198.51.100.0/120"]}}, "network.trusted"),
    (
        {"mail": {"relays": [{**RELAY, "starttls": "disabled"}]}},
        "mail.relays[0].starttls",
    ),
    # The live mailbox map needs both: one alone leaves the cached probe.
    ({"policyd": {"aliases_listen": "unix:/run/a.sock"}}, "policyd.mailbox_lmtp"),
    ({"policyd": {"mailbox_lmtp": "unix:/run/l.sock"}}, "policyd.aliases_listen"),
    (
        {"policyd": {"aliases_listen": "unix:/run/a.sock", "mailbox_lmtp": "inet:127.0.0.1:24"}},
        "policyd.mailbox_lmtp",
    ),
    (
        {
            "policyd": {
                "aliases_listen": "unix:/run/a.sock",
                "mailbox_lmtp": "unix:/var/spool/postfix/private/dovecot-lmtp",
            }
        },
        "policyd.mailbox_lmtp",
    ),
    (
        {"mail": {"sender_grants": {"a@localhost": ["@gmail.example"]}}},
        "mail.sender_grants.'a@localhost'",
    ),
]

# Configs that turn a protection off where it protects nothing: no hazard.
HARMLESS: list[dict[str, Any]] = [
    {},
    # No SMTP AUTH at all: neither clear-text AUTH nor its rate limit matters.
    {"mail": {"sasl": False, "submission": False, "smtps": False, "tls_only_auth": False}},
    {"mail": {"sasl": False, "submission": False, "smtps": False, "auth_rate_limit": 0}},
    # No clear-text IMAP/POP3 port is open.
    {"mail": {"imap_pop3_require_tls": False, "imap": False, "pop3": False}},
    # Only local clients reach Postfix: a public trusted entry matches nobody.
    {"mail": {"listen": "loopback"}, "network": {"trusted": ["198.51.100.0/24"]}},
    # Private space of every kind is the site's own.
    {
        "network": {
            "trusted": [
                "127.0.0.0/8",
                "::1",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "169.254.0.0/16",
                "fc00::/7",
                "fe80::/10",
                "::ffff:10.0.0.0/104",
            ]
        }
    },
    # Relay credentials over TLS (opportunistic, required, or smtps).
    {"mail": {"relays": [{**RELAY, "starttls": "required"}]}},
    {"mail": {"relays": [{**RELAY, "protocol": "smtps"}]}},
    # Both halves of the live mailbox map; grants within our own domains.
    {"policyd": {"aliases_listen": "unix:/run/a.sock", "mailbox_lmtp": "unix:/run/l.sock"}},
    {
        "mail": {"additional_domains": ["example.org"]},
        "policyd": {},
    },
    {"mail": {"sender_grants": {"a@localhost": ["@localhost", "ceo@elsewhere.example"]}}},
    # AUTH exists only on 587 (STARTTLS enforced) and 465 (TLS): this key guards nothing.
    {"mail": {"tls_only_auth": False}},
    # No credentials: nothing to leak.
    {"mail": {"relays": [{"name": "lan", "host": "10.0.0.2", "starttls": "disabled"}]}},
]

OPEN_RELAY_NETWORKS = [
    ["0.0.0.0/0"],
    ["::/0"],
    ["0.0.0.0/0", "::/0"],
    ["127.0.0.0/8", "8.0.0.0/8"],
    ["0.0.0.0/1"],
    ["100.64.0.0/10"],  # carrier-grade NAT: other customers of the provider
    ["203.0.0.0/15"],
    ["2000::/3"],
    ["2001:db8::/31"],
    ["::ffff:0:0/96"],  # every IPv4 client of a dual-stack socket
    ["::/64"],  # holds ::ffff:0:0/96
    ["::ffff:0.0.0.0/97"],  # half of IPv4
    ["64:ff9b::/96"],  # NAT64: every IPv4 address
]


@pytest.mark.parametrize(("data", "key"), WARNED)
def test_each_risky_setting_is_warned_naming_its_key(data: dict[str, Any], key: str) -> None:
    [hazard] = config_hazards(parse_config(data))
    assert hazard.key == key
    assert not hazard.refuse
    assert hazard.message


@pytest.mark.parametrize("data", HARMLESS)
def test_settings_that_open_nothing_give_no_hazard(data: dict[str, Any]) -> None:
    assert config_hazards(parse_config(data)) == []


def test_every_weakening_at_once_gives_one_warning_each() -> None:
    data: dict[str, Any] = {
        "mail": {
            "smuggling_protection": False,
            "reject_forged_local_senders": False,
            "imap_pop3_require_tls": False,
            "auth_rate_limit": 0,
        },
        "milterd": {"from_mismatch": "unsigned"},
    }
    keys = [h.key for h in config_hazards(parse_config(data))]
    assert sorted(keys) == sorted(
        [
            "mail.smuggling_protection",
            "mail.reject_forged_local_senders",
            "mail.imap_pop3_require_tls",
            "mail.auth_rate_limit",
            "milterd.from_mismatch",
        ]
    )


@pytest.mark.parametrize("trusted", OPEN_RELAY_NETWORKS)
def test_trusting_the_internet_is_refused_by_the_model(trusted: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"network": {"trusted": trusted}})
    [problem] = caught.value.problems
    assert problem.startswith("network.trusted: ")
    assert "open relay" in problem


def test_the_refusal_names_each_wide_network_and_not_the_fine_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"network": {"trusted": ["127.0.0.0/8", "0.0.0.0/0", "10.0.0.0/8"]}})
    [problem] = caught.value.problems
    assert "0.0.0.0/0" in problem
    assert "127.0.0.0/8" not in problem and "10.0.0.0/8" not in problem


def test_hazard_is_a_frozen_value() -> None:
    hazard = Hazard("mail.tls_only_auth", "why", refuse=False)
    with pytest.raises(AttributeError):
        hazard.key = "other"  # type: ignore[misc]
    assert hazard == Hazard("mail.tls_only_auth", "why", refuse=False)


def test_the_open_relay_rule_is_a_refusal_of_network_trusted() -> None:
    loopback, internet = ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("0.0.0.0/0")
    hazard = open_relay_networks([loopback, internet])
    assert hazard is not None
    assert (hazard.key, hazard.refuse) == ("network.trusted", True)
    assert open_relay_networks([loopback, ipaddress.ip_network("198.51.100.0/24")]) is None


def test_refusals_come_first_even_for_an_unvalidated_config() -> None:
    # model_construct skips validation: config_hazards still refuses what the model would.
    network = NetworkConfig.model_construct(trusted=[ipaddress.ip_network("0.0.0.0/0")])
    mail = MailConfig(smuggling_protection=False)
    hazards = config_hazards(Config.model_construct(network=network, mail=mail))
    assert [(h.key, h.refuse) for h in hazards][:1] == [("network.trusted", True)]
    assert ("mail.smuggling_protection", False) in [(h.key, h.refuse) for h in hazards]


GATEWAY: dict[str, Any] = {
    "enabled": True,
    "domains": ["backend.example"],
    "ca": "/etc/postwarden/backend/ca.pem",
    "smtp": {"host": "mail.backend.example"},
    "imap": {"host": "mail.backend.example"},
}


def test_a_complete_gateway_config_has_no_hazard() -> None:
    assert config_hazards(parse_config({"gateway": GATEWAY})) == []
    assert config_hazards(parse_config({"gateway": {**GATEWAY, "enabled": False}})) == []


def test_logins_before_tls_are_refused_in_gateway_mode_and_warned_otherwise() -> None:
    mail = {"imap_pop3_require_tls": False}
    (local,) = config_hazards(parse_config({"mail": mail}))
    assert (local.key, local.refuse) == ("mail.imap_pop3_require_tls", False)
    (gateway,) = config_hazards(parse_config({"mail": mail, "gateway": GATEWAY}))
    assert (gateway.key, gateway.refuse) == ("mail.imap_pop3_require_tls", True)
    assert "the backend's passwords" in gateway.message


def test_a_gateway_without_the_backends_imap_is_warned_inbound_only() -> None:
    gateway = {k: v for k, v in GATEWAY.items() if k != "imap"}
    (hazard,) = config_hazards(parse_config({"gateway": gateway}))
    assert (hazard.key, hazard.refuse) == ("gateway.imap", False)
    assert "inbound filtering only" in hazard.message


def test_a_certificate_name_dovecot_cannot_check_is_warned() -> None:
    # By name, the login proxy checks the host's name; by address, imapc checks the address.
    by_name = {**GATEWAY, "certificate_name": "cert.backend.example"}
    warned = config_hazards(parse_config({"gateway": by_name}))
    assert [(h.key, h.refuse) for h in warned] == [("gateway.imap.host", False)]
    assert "Dovecot's proxy checks" in warned[0].message
    by_address = {**by_name, "imap": {"host": "192.0.2.7"}, "pop3": {"host": "mx.example"}}
    warned = config_hazards(parse_config({"gateway": by_address}))
    assert [h.key for h in warned] == ["gateway.imap.host", "gateway.pop3.host"]
    assert "imapc" in warned[0].message and "192.0.2.7" in warned[0].message
    # The name the certificate carries is the host itself: nothing to say.
    same = {**GATEWAY, "certificate_name": "mail.backend.example"}
    assert config_hazards(parse_config({"gateway": same})) == []


def test_an_unencrypted_backend_service_is_warned_for_tests_only() -> None:
    gateway = {**GATEWAY, "imap": {"host": "10.0.0.5", "security": "none"}}
    hazards = config_hazards(parse_config({"gateway": gateway}))
    warned = [h for h in hazards if not h.refuse]
    assert [h.key for h in warned] == ["gateway.imap.security"]
    assert "for tests only" in warned[0].message
