"""`postwarden config check|get|apply` on real files: refusals, warnings, hostile TOML, values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cli.main import cli

OPEN_RELAY = '[network]\ntrusted = ["0.0.0.0/0", "::/0"]\n'
DEEP = 5000  # past the interpreter's recursion limit


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "postwarden.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run(path: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(path), *args])


def run_process(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it: its own process, so a traceback would show."""
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- config check: refusals and warnings ---------------------------------------------------


def test_an_open_relay_is_refused_naming_network_trusted(tmp_path: Path) -> None:
    path = write(tmp_path, OPEN_RELAY)
    result = run(path, "config", "check")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{path}: network.trusted: 0.0.0.0/0, ::/0 ")
    assert "open relay" in result.stderr
    assert "OK" not in result.stdout


def test_an_open_relay_is_refused_in_json_too(tmp_path: Path) -> None:
    path = write(tmp_path, OPEN_RELAY)
    result = run(path, "config", "check", "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["config"] == str(path)
    [error] = report["errors"]
    assert error.startswith("network.trusted: ")


def test_weakened_settings_are_warned_naming_the_key_and_still_pass(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[mail]\nsmuggling_protection = false\n[milterd]\nfrom_mismatch = "unsigned"\n',
    )
    result = run(path, "config", "check")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: warning: mail.smuggling_protection: ")
    assert lines[1].startswith(f"{path}: warning: milterd.from_mismatch: ")
    assert result.stdout == f"OK: {path} (2 warning(s))\n"


def test_warnings_are_in_the_json_report(tmp_path: Path) -> None:
    path = write(tmp_path, "[mail]\nauth_rate_limit = 0\n")
    result = run(path, "config", "check", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["errors"] == []
    [warning] = report["warnings"]
    assert warning["key"] == "mail.auth_rate_limit"
    assert "password guessing" in warning["message"]


def test_the_defaults_give_no_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    result = run(path, "config", "check", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "ok": True,
        "config": str(path),
        "errors": [],
        "warnings": [],
    }
    assert run(path, "config", "check").stderr == ""


def test_apply_refuses_an_open_relay_before_touching_anything(tmp_path: Path) -> None:
    path = write(tmp_path, OPEN_RELAY)
    postfix, dovecot = tmp_path / "postfix", tmp_path / "dovecot"
    result = run(
        path, "config", "apply", "--postfix-dir", str(postfix), "--dovecot-dir", str(dovecot)
    )
    assert result.exit_code == 2
    assert f"{path}: network.trusted: " in result.stderr
    assert not postfix.exists() and not dovecot.exists()


@pytest.mark.parametrize("command", [["lists", "show"], ["config", "get", "mail.hostname"]])
def test_no_command_runs_with_an_open_relay(tmp_path: Path, command: list[str]) -> None:
    path = write(tmp_path, OPEN_RELAY + '[store]\nurl = "sqlite:///' + str(tmp_path) + '/s.db"\n')
    result = run(path, *command)
    assert result.exit_code == 2
    assert f"{path}: network.trusted: " in result.stderr


# --- hostile TOML: one line, exit 2, no traceback, for every command ------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * DEEP + "]" * DEEP + "\n",
        "a = " + "{b = " * DEEP + "1" + "}" * DEEP + "\n",
        "x." * 20_000 + "a = 1\n",
    ],
    ids=["nested-arrays", "nested-inline-tables", "long-dotted-key"],
)
@pytest.mark.parametrize(
    "command", [["config", "check"], ["config", "get", "mail.hostname"], ["lists", "show"]]
)
def test_hostile_toml_is_one_error_line_and_exit_2(
    tmp_path: Path, text: str, command: list[str]
) -> None:
    path = write(tmp_path, text)
    done = run_process(path, *command)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"{path}: not valid TOML: ")
    assert done.stdout == ""


# --- config get --------------------------------------------------------------------------

CONFIG = """\
[mail]
hostname = "mx.example.com"
[[mail.relays]]
name = "provider"
host = "smtp.example.net"
port = 587
[greylisting]
delay = 300
"""


@pytest.mark.parametrize(
    ("key", "printed"),
    [
        ("mail.hostname", "mx.example.com"),  # set in the file
        ("mail.main_domain", "localhost"),  # a default
        ("mail.sasl", "true"),
        ("greylisting.add_header", "true"),
        ("dnsbl.enabled", "false"),
        ("mail.smtp_port", "25"),
        ("greylisting.delay", "300"),
        ("store.timeout", "1"),  # 1.0 seconds, as shell arithmetic wants it
        ("store.refresh_interval", "0.5"),
        ("mail.helo_name", ""),  # unset
        ("mail.relays[0].host", "smtp.example.net"),
        ("mail.relays.0.port", "587"),
        ("network.trusted", '["127.0.0.0/8", "::1/128"]'),
        ("mail.additional_domains", "[]"),
        ("mail.tls", '{"cert": null, "key": null, "ca": null, "outbound_level": "may"}'),
    ],
)
def test_get_prints_the_effective_value(tmp_path: Path, key: str, printed: str) -> None:
    result = run(write(tmp_path, CONFIG), "config", "get", key)
    assert result.exit_code == 0, result.output
    assert result.stdout == printed + "\n"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("mail.hostname", "mx.example.com"),
        ("mail.helo_name", None),
        ("mail.sasl", True),
        ("greylisting.delay", 300),
        ("mail.relays[0].sender_domains", []),
    ],
)
def test_get_json_is_always_json(tmp_path: Path, key: str, value: Any) -> None:
    result = run(write(tmp_path, CONFIG), "config", "get", "--json", key)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == value


def test_get_a_table_of_tables(tmp_path: Path) -> None:
    result = run(write(tmp_path, CONFIG), "config", "get", "mail.relays")
    assert result.exit_code == 0, result.output
    [relay] = json.loads(result.stdout)
    assert (relay["name"], relay["host"], relay["port"]) == ("provider", "smtp.example.net", 587)
    assert relay["starttls"] == "enabled"  # the default, filled in


def test_get_reads_the_defaults_without_a_file(tmp_path: Path) -> None:
    result = run(write(tmp_path, ""), "config", "get", "store.url")
    assert result.exit_code == 0, result.output
    assert result.stdout == "sqlite:///var/lib/postwarden/state.db\n"


def test_get_lines_prints_a_list_one_plain_item_per_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[policyd]\nlisten = ["unix:/run/a.sock", "inet:127.0.0.1:10040"]\n')
    result = run(path, "config", "get", "--lines", "policyd.listen")
    assert result.exit_code == 0, result.output
    assert result.stdout == "unix:/run/a.sock\ninet:127.0.0.1:10040\n"
    # A single value is one item, an unset optional one none, an empty list no line.
    one = run(path, "config", "get", "--lines", "milterd.listen[0]")
    assert (one.exit_code, one.stdout) == (0, "unix:/run/postwarden/milterd.sock\n")
    unset = run(path, "config", "get", "--lines", "policyd.aliases_listen")
    assert (unset.exit_code, unset.stdout) == (0, "")
    empty = run(path, "config", "get", "--lines", "mail.additional_domains")
    assert (empty.exit_code, empty.stdout) == (0, "")


def test_get_fields_prints_each_table_tab_separated_with_defaults(tmp_path: Path) -> None:
    # The DKIM keys as install.sh reads them: the algorithm is the model's default here.
    path = write(
        tmp_path,
        '[[dkim.keys]]\ndomain = "example.com"\nselector = "s1"\nkey = "/k/a b.key"\n'
        '[[dkim.keys]]\ndomain = "example.org"\nselector = "s2"\n'
        'algorithm = "ed25519-sha256"\nkey = "/k/b.key"\n',
    )
    result = run(path, "config", "get", "dkim.keys", "--fields", "domain,selector,algorithm,key")
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "example.com\ts1\trsa-sha256\t/k/a b.key\nexample.org\ts2\ted25519-sha256\t/k/b.key\n"
    )
    none = run(write(tmp_path, ""), "config", "get", "dkim.keys", "--fields", "domain")
    assert (none.exit_code, none.stdout) == (0, "")


@pytest.mark.parametrize(
    "args",
    [
        ["--lines", "mail.relays"],  # items are tables
        ["--lines", "mail.tls"],  # a table
        ["--fields", "name,nope", "mail.relays"],  # no such field
        ["--fields", "name", "network.trusted"],  # items are not tables
    ],
)
def test_get_lines_or_fields_of_the_wrong_shape_exits_2(tmp_path: Path, args: list[str]) -> None:
    result = run(write(tmp_path, CONFIG), "config", "get", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")


@pytest.mark.parametrize(
    "key",
    ["mail.hostnam", "nope", "mail.hostname.x", "mail..hostname", "", "mail.relays[1]", "mail["],
)
def test_get_an_unknown_key_exits_2_naming_it(tmp_path: Path, key: str) -> None:
    result = run(write(tmp_path, CONFIG), "config", "get", key)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {key!r} is not a config key")


def test_get_on_a_bad_file_exits_2_with_the_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "[greylisting]\ndelay = -1\n")
    result = run(path, "config", "get", "mail.hostname")
    assert result.exit_code == 2
    assert f"{path}: greylisting.delay = -1" in result.stderr
