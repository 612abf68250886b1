"""`postwarden aliases` against a real SQLite store, and Postfix reading the result live."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.main import cli
from policyd.lookup_maps import socketmap_handler
from postwarden.store import open_store
from tests.fixtures.policyd_daemon import POSTWARDEN

POSTMAP_TIMEOUT = 10.0


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "postwarden.toml"
    path.write_text(
        f'[store]\nurl = "sqlite://{tmp_path}/state.db"\n\n'
        '[mail]\nmain_domain = "example.com"\nadditional_domains = ["example.org"]\n'
    )
    return path


def run(config_file: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config_file), *args])


def test_seed_examples_round_trip_through_the_store(config_file: Path) -> None:
    assert run(config_file, "aliases", "add", "manager", "r.johnson").exit_code == 0
    assert run(config_file, "aliases", "add", "sales", "j.smith", "r.johnson").exit_code == 0
    added = run(config_file, "aliases", "add", "r.johnson", "j.smith", "r.johnson")
    assert added.exit_code == 0
    assert "(copy)" in added.output
    assert run(config_file, "aliases", "add", "ceo", "ceo@gmail.com").exit_code == 0

    shown = run(config_file, "aliases", "show", "--json")
    assert shown.exit_code == 0
    assert json.loads(shown.output) == {
        "ceo@example.com": ["ceo@gmail.com"],
        "manager@example.com": ["r.johnson@example.com"],
        "r.johnson@example.com": ["j.smith@example.com", "r.johnson@example.com"],
        "sales@example.com": ["j.smith@example.com", "r.johnson@example.com"],
    }
    text = run(config_file, "aliases", "show").output.splitlines()
    assert "sales@example.com -> j.smith@example.com, r.johnson@example.com  (group)" in text
    assert "manager@example.com -> r.johnson@example.com  (alias)" in text


def test_add_replaces_and_remove_deletes(config_file: Path) -> None:
    run(config_file, "aliases", "add", "info", "a")
    run(config_file, "aliases", "add", "info", "b", "c")
    assert json.loads(run(config_file, "aliases", "show", "info", "--json").output) == {
        "info@example.com": ["b@example.com", "c@example.com"]
    }
    assert run(config_file, "aliases", "remove", "INFO@example.com").exit_code == 0
    gone = run(config_file, "aliases", "show", "info")
    assert gone.exit_code == 1
    assert run(config_file, "aliases", "remove", "info").exit_code == 1


def test_bad_rules_exit_2_and_loops_exit_1(config_file: Path) -> None:
    outside = run(config_file, "aliases", "add", "x@gmail.com", "a")
    assert outside.exit_code == 2
    assert "only addresses in our own domains" in outside.output
    assert run(config_file, "aliases", "add", "a", "b").exit_code == 0
    loop = run(config_file, "aliases", "add", "b", "a")
    assert loop.exit_code == 1
    assert "b@example.com -> a@example.com -> b@example.com" in loop.output
    assert run(config_file, "aliases", "show", "b").exit_code == 1


async def _postmap(config_dir: Path, table: str, key: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "postmap",
        "-c",
        str(config_dir),
        "-q",
        key,
        table,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), POSTMAP_TIMEOUT)
    return proc.returncode or 0, out.decode()


async def test_cli_change_is_seen_by_postfix_without_reload(
    config_file: Path, tmp_path: Path
) -> None:
    # The same store the policy daemon would serve, behind the socketmap, asked by postmap.
    (tmp_path / "main.cf").write_text("")
    sock = tmp_path / "aliases.sock"
    store = open_store(f"sqlite://{tmp_path}/state.db")
    server = await asyncio.start_unix_server(socketmap_handler(store), path=str(sock))
    table = f"socketmap:unix:{sock}:aliases"
    try:
        assert (await _postmap(tmp_path, table, "sales@example.com"))[0] == 1
        added = await asyncio.to_thread(
            subprocess.run,
            [
                POSTWARDEN,
                "--config",
                str(config_file),
                "aliases",
                "add",
                "sales",
                "j.smith",
                "r.johnson",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert added.returncode == 0, added.stderr
        assert await _postmap(tmp_path, table, "Sales@example.com") == (
            0,
            "j.smith@example.com,r.johnson@example.com\n",
        )
    finally:
        server.close()
        await server.wait_closed()
        await store.close()
