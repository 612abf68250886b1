"""`config apply` reloads Dovecot before Postfix (cli/commands_config.py says why)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import commands_config
from cli.main import cli


def test_dovecot_is_reloaded_before_postfix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def tool(argv: list[str]) -> tuple[int, str]:
        calls.append(" ".join(a for a in argv if not a.startswith("/")))
        return 0, ""

    monkeypatch.setattr(commands_config, "_tool", tool)
    monkeypatch.setattr(commands_config, "check_rendered", lambda staging: None)
    config = tmp_path / "postwarden.toml"
    config.write_text('[mail]\nhostname = "mx.example.test"\n', encoding="utf-8")
    postfix, dovecot = tmp_path / "postfix", tmp_path / "dovecot"
    dirs = ["--postfix-dir", str(postfix), "--dovecot-dir", str(dovecot)]
    result = CliRunner().invoke(cli, ["--config", str(config), "config", "apply", *dirs])
    assert result.exit_code == 0, result.output
    assert calls == ["doveadm -c reload", "postfix -c status", "postfix -c reload"]
    assert (dovecot / "dovecot.conf").is_file() and (postfix / "main.cf").is_file()
