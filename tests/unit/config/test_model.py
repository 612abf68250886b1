"""The one config model: defaults run, and every bad file names the file, the key and the rule."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from postwarden.config import Config, ConfigError, load_config, parse_config
from postwarden.config.types import ListenAddress


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "postwarden.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


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
    ],
)
def test_bad_file_names_file_key_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[greylisting]\ndelay = -1\nexpiry = -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.problems) == 2


def test_toml_syntax_error_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[greylisting\n"))


def test_non_utf8_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(write(tmp_path, b"\xff\xfe[x]"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")
    assert load_config(tmp_path / "nope.toml", missing_ok=True) == Config()


def test_environment_variable_selects_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "[greylisting]\ndelay = 7\n")
    monkeypatch.setenv("POSTWARDEN_CONFIG", str(path))
    assert load_config().greylisting.delay == 7


def test_config_is_frozen() -> None:
    cfg = parse_config({})
    with pytest.raises(ValueError, match="frozen"):
        cfg.greylisting.delay = 1  # type: ignore[misc]


def test_check_across_keys_names_them_without_dumping_the_table(tmp_path: Path) -> None:
    path = write(tmp_path, "[mail]\nsubmission_port = 25\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: mail: submission_port = 25 is already used by smtp_port"


DEEP = 5000  # far past the interpreter's recursion limit (1000)


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * DEEP + "]" * DEEP + "\n",
        "a = " + "{b = " * DEEP + "1" + "}" * DEEP + "\n",
        "[mail]\nrelays = " + "[" * DEEP + "]" * DEEP + "\n",
    ],
    ids=["arrays", "inline-tables", "inside-a-known-key"],
)
def test_deep_nesting_is_one_error_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: not valid TOML: arrays or tables nested too deeply"


@pytest.mark.parametrize(
    "text",
    [
        "x." * 20_000 + "a = 1\n",
        "[" + "x." * 20_000 + "a]\n",
        '"a\\"".' * 20_000 + "x = 1\n",  # escaped quotes inside the parts
        "a = { " + "b." * 40 + "c = 1 }\n",
        '"q".' * 40 + "a = 1\n",
    ],
    ids=["dotted-key", "table-header", "escaped-quotes", "inline-table-key", "quoted-parts"],
)
def test_a_key_of_thousands_of_parts_is_refused_at_once(tmp_path: Path, text: str) -> None:
    # tomllib's time grows with the square of the parts: 20,000 take it seconds.
    path = write(tmp_path, text)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="a key with more than 32 parts"):
        load_config(path)
    assert time.monotonic() - started < 1


DOTS = "a, " + "b." * 40 + "c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'[greylisting]\ndefer_text = "{DOTS}"\n', DOTS),
        (f"[greylisting]\ndefer_text = '{DOTS}'\n", DOTS),
        (f'[greylisting]\ndefer_text = """\n{DOTS}"""\n', DOTS),
        (f"[greylisting]\ndefer_text = '''\n{DOTS}'''\n", DOTS),
        (f"[greylisting]\n# {DOTS}\ndefer_text = 'x'\n", "x"),
    ],
    ids=["basic", "literal", "multi-line-basic", "multi-line-literal", "comment"],
)
def test_dots_inside_strings_and_comments_are_no_deep_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    assert load_config(write(tmp_path, text)).greylisting.defer_text == expected


def test_an_integer_of_thousands_of_digits_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, "[greylisting]\ndelay = 1" + "0" * 5000 + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: not valid TOML: ")


def test_a_file_larger_than_a_config_is_not_read(tmp_path: Path) -> None:
    path = write(tmp_path, "# padding\n" * 200_000)  # 2 MB of comments
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: larger than 1 MiB: not a config file"
