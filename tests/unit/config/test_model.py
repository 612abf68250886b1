"""The one config model: defaults run, and every bad file names the file, the key and the rule."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from postwarden.config import Config, ConfigError, load_config, parse_config
from postwarden.config.types import ListenAddress
from postwarden.policy import spf_check
from tests.unit.config.config_files import write


def test_empty_file_gives_working_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg == Config()
    assert cfg.store.url == "sqlite:///var/lib/postwarden/state.db"
    assert cfg.policyd.listen == [ListenAddress("unix", path="/run/postwarden/policyd.sock")]
    assert cfg.greylisting.enabled and cfg.greylisting.delay == 300
    assert cfg.greylisting.retry_window == 2 * 86400
    assert cfg.greylisting.expiry == 35 * 86400
    assert not cfg.dnsbl.enabled and not cfg.spf.enabled
    assert ipaddress.ip_network("127.0.0.0/8") in cfg.network.trusted


def test_design_example_file_is_valid(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[store]
url = "redis://127.0.0.1:6379/0"
[policyd]
listen = ["unix:/run/postwarden/policyd.sock", "inet:127.0.0.1:10040"]
[milterd]
listen = ["inet:127.0.0.1:8891"]
[greylisting]
enabled = true
delay = 300
[dnsbl]
enabled = true
zones = [{ zone = "zen.spamhaus.org", weight = 2, codes = ["127.0.0.2-127.0.0.11"] }]
[spf]
enabled = false
[dkim]
sign = true
verify = true
[[dkim.keys]]
domain = "example.com"
selector = "s1"
algorithm = "rsa-sha256"
key = "/etc/postwarden/dkim/example.com.s1.key"
[network]
trusted = ["127.0.0.0/8", "::1/128", "10.0.0.5/255.255.255.255"]
""",
        )
    )
    assert cfg.policyd.listen[1] == ListenAddress("inet", host="127.0.0.1", port=10040)
    assert cfg.dnsbl.zones[0].weight == 2
    assert cfg.dkim.keys[0].selector == "s1"
    assert ipaddress.ip_network("10.0.0.5/32") in cfg.network.trusted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[greylisting]\ndalay = 30\n", "greylisting.dalay: unknown key"),
        ("[greylisting]\ndelay = -5\n", "greylisting.delay = -5: must be zero or more seconds"),
        ('[greylisting]\ndelay = "soon"\n', "greylisting.delay = 'soon'"),
        ('[policyd]\nlisten = ["tcp:1.2.3.4:5"]\n', 'must start with "unix:" or "inet:"'),
        ('[policyd]\nlisten = ["inet:127.0.0.1:99999"]\n', "port must be 1..65535"),
        ('[policyd]\nlisten = ["unix:relative.sock"]\n', "unix socket path must be absolute"),
        ('[store]\nurl = "mysql://x"\n', "store.url = 'mysql://x': must start with one of"),
        ('[network]\ntrusted = ["10.0.0.300/8"]\n', "is not an IP network"),
        ("[dnsbl]\nenabled = true\n", "needs at least one [[dnsbl.zones]] entry"),
        ("[dnsbl]\nzones = [{ weight = 2 }]\n", "dnsbl.zones[0].zone: required key is missing"),
        ("[dkim.keys]\n", "dkim.keys"),
        ('[[dkim.keys]]\ndomain="a"\nselector="s"\nkey="/k"\nalgorithm="rsa-sha1"\n', "rsa-sha256"),
        ('[policyd]\ndefault_action = "REJECT"\n', "'DUNNO' or 'DEFER_IF_PERMIT'"),
        ("[greylisting]\nipv4_prefix = 33\n", "greylisting.ipv4_prefix = 33"),
        ('[dns]\nnameservers = ["not-an-ip"]\n', "dns.nameservers[0] = 'not-an-ip': not a valid"),
        ("[store]\nrefresh_interval = 5\n", "store.refresh_interval = 5"),
        ('[network]\ntrusted = ["0.0.0.0/0"]\n', "network.trusted: 0.0.0.0/0 would trust"),
        (
            '[frontd]\nsasl_listen = "unix:/run/a.sock"\n',
            "frontd.sasl_listen and frontd.sasl_upstream are set together",
        ),
        (
            '[frontd]\nsasl_listen = "unix:/a"\nsasl_upstream = "inet:127.0.0.1:9"\n',
            "frontd.sasl_upstream must be a unix: socket",
        ),
        (
            '[frontd]\nenabled = true\nmilter_listen = "unix:/run/postwarden/milterd.sock"\n',
            "frontd.milter_listen unix:/run/postwarden/milterd.sock is another daemon's socket",
        ),
    ],
)
def test_bad_file_names_file_key_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_config_is_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(ValueError, match="frozen"):
        cfg.greylisting.delay = 1  # type: ignore[misc]


def test_check_across_keys_names_them_without_dumping_the_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[mail]\nsubmission_port = 25\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: mail: submission_port = 25 is already used by smtp_port"


def test_default_spf_budget_fits_inside_the_policy_service_timeout() -> None:
    # RFC 7208 section 4.6.4: an SPF limit "SHOULD allow at least 20 seconds". Postfix waits
    # policyd.request_timeout for an answer, and policyd gives up on its own checks then, so
    # the DNS checks (DNSBL, then SPF and its backstop) must end before it.
    cfg = Config()
    assert cfg.spf.timeout >= 20
    checks = cfg.dnsbl.budget + cfg.spf.timeout + spf_check.GRACE
    assert checks < cfg.policyd.request_timeout
