"""What the CLI tests share: `postwarden --config <tmp config> ...` run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.main import cli


class Postwarden:
    """Runs `postwarden --config <tmp config> ...` in-process."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = tmp_path / "postwarden.toml"
        self.config.write_text(
            f'[store]\nurl = "sqlite://{tmp_path}/state.db"\n\n[greylisting]\ndelay = 300\n',
            encoding="utf-8",
        )
        self.runner = CliRunner()

    def __call__(self, *args: str, stdin: str | None = None) -> Result:
        return self.runner.invoke(cli, ["--config", str(self.config), *args], input=stdin)

    def entries(self, list_name: str) -> list[dict[str, str]]:
        result = self("lists", "show", list_name, "--json")
        assert result.exit_code == 0, result.output
        rows: list[dict[str, str]] = json.loads(result.stdout)
        return rows


@pytest.fixture
def postwarden(tmp_path: Path) -> Postwarden:
    return Postwarden(tmp_path)
