"""`postwarden lists` against a real SQLite store in a temp dir."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import commands_lists
from cli.main import cli
from tests.integration.cli.conftest import Postwarden

# The sample import file of the seed (003): addresses, addr:mask groups, IPv6 prefixes.
SEED_IMPORT = """\
192.168.1.1
192.168.2.0:255.255.255.0
192.168.3.1:255.255.255.128
192.168.4.100
192.168.5.32:255.255.255.192
2001:db8:10ff::ae:44f2
2001:db8::/32
"""


def test_add_show_remove(postwarden: Postwarden) -> None:
    added = postwarden(
        "lists", "add", "permitted", "10.128.0.3", "192.168.130.3", "Example.com",
        "--comment", "seed sample",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "3 added" in added.stdout
    assert (
        postwarden("lists", "add", "forbidden", "192.168.130.3", "J.Smith@Test.com").exit_code == 0
    )
    assert postwarden.entries("permitted") == [
        {"list": "permitted", "entry": "10.128.0.3", "comment": "seed sample"},
        {"list": "permitted", "entry": "192.168.130.3", "comment": "seed sample"},
        {"list": "permitted", "entry": "example.com", "comment": "seed sample"},
    ]
    both = json.loads(postwarden("lists", "show", "--json").stdout)
    assert {(row["list"], row["entry"]) for row in both} >= {
        ("forbidden", "j.smith@test.com"),
        ("forbidden", "192.168.130.3"),
    }
    table = postwarden("lists", "show")
    assert table.exit_code == 0
    assert "j.smith@test.com" in table.stdout and "seed sample" in table.stdout
    # Any spelling removes the canonical entry.
    removed = postwarden("lists", "remove", "forbidden", "J.SMITH@test.com")
    assert removed.exit_code == 0, removed.output
    assert [row["entry"] for row in postwarden.entries("forbidden")] == ["192.168.130.3"]


def test_wildcards_and_masks_are_stored_canonically(postwarden: Postwarden) -> None:
    result = postwarden("lists", "add", "forbidden", "192.168.1.*", "10.0.0.0:255.0.0.0")
    assert result.exit_code == 0, result.output
    assert [row["entry"] for row in postwarden.entries("forbidden")] == [
        "10.0.0.0/8",
        "192.168.1.0/24",
    ]
    assert postwarden("lists", "remove", "forbidden", "192.168.1.0/24").exit_code == 0


def test_re_adding_reports_already_present(postwarden: Postwarden) -> None:
    assert postwarden("lists", "add", "permitted", "example.com").exit_code == 0
    again = postwarden("lists", "add", "permitted", "EXAMPLE.com")
    assert again.exit_code == 0
    assert "0 added, 1 already present" in again.stdout


def test_invalid_entry_exits_2_and_adds_nothing(postwarden: Postwarden) -> None:
    result = postwarden("lists", "add", "forbidden", "192.0.2.1", "192.168.*.5")
    assert result.exit_code == 2
    assert "trailing octets" in result.stderr
    assert postwarden.entries("forbidden") == []


def test_unknown_list_name_is_a_usage_error(postwarden: Postwarden) -> None:
    assert postwarden("lists", "add", "allowed", "192.0.2.1").exit_code == 2


def test_removing_an_absent_entry_exits_1(postwarden: Postwarden) -> None:
    assert postwarden("lists", "add", "permitted", "192.0.2.1").exit_code == 0
    result = postwarden("lists", "remove", "permitted", "192.0.2.1", "192.0.2.2")
    assert result.exit_code == 1
    assert "1 removed" in result.stdout
    assert "not in the list" in result.stderr
    assert postwarden.entries("permitted") == []


def test_import_the_seed_format(postwarden: Postwarden, tmp_path: Path) -> None:
    source = tmp_path / "ips.txt"
    source.write_text("# exported by IMSS\n\n" + SEED_IMPORT + "mx.example.com  # partner\n")
    result = postwarden("lists", "import", "permitted", str(source), "--comment", "imss")
    assert result.exit_code == 0, result.output
    rows = {row["entry"]: row["comment"] for row in postwarden.entries("permitted")}
    assert rows == {
        "192.168.1.1": "imss",
        "192.168.2.0/24": "imss",
        "192.168.3.0/25": "imss",
        "192.168.4.100": "imss",
        "192.168.5.0/26": "imss",
        "2001:db8:10ff::ae:44f2": "imss",
        "2001:db8::/32": "imss",
        "mx.example.com": "partner",
    }


def test_malformed_file_names_each_bad_line_and_imports_nothing(
    postwarden: Postwarden, tmp_path: Path
) -> None:
    source = tmp_path / "bad.txt"
    source.write_text("192.0.2.1\n\n192.168.2.0:255.0.255.0\nexample.com\n10.1.*.3\n")
    result = postwarden("lists", "import", "forbidden", str(source))
    assert result.exit_code == 2
    assert f"{source}:3:" in result.stderr and "not contiguous" in result.stderr
    assert f"{source}:5:" in result.stderr and "trailing octets" in result.stderr
    assert "nothing imported" in result.stderr
    assert postwarden.entries("forbidden") == []


def test_import_of_a_missing_file_exits_2(postwarden: Postwarden, tmp_path: Path) -> None:
    result = postwarden("lists", "import", "forbidden", str(tmp_path / "none.txt"))
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


def test_import_100k_lines_then_export_round_trips(postwarden: Postwarden, tmp_path: Path) -> None:
    source = tmp_path / "big.txt"
    lines = [f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(100_000)]
    source.write_text("\n".join(lines) + "\n")
    result = postwarden("lists", "import", "forbidden", str(source))
    assert result.exit_code == 0, result.output
    assert "100000 entries read, 100000 new" in result.stdout
    exported = tmp_path / "out.txt"
    assert postwarden("lists", "export", "forbidden", str(exported)).exit_code == 0
    body = [line for line in exported.read_text().splitlines() if not line.startswith("#")]
    assert sorted(body) == sorted(lines)


def test_export_import_round_trip_keeps_entries_and_comments(
    postwarden: Postwarden, tmp_path: Path
) -> None:
    assert postwarden("lists", "add", "permitted", "192.168.1.*", "--comment", "lan").exit_code == 0
    assert postwarden("lists", "add", "permitted", ".example.com", "j@test.com").exit_code == 0
    exported = postwarden("lists", "export", "permitted")
    assert exported.exit_code == 0
    assert "192.168.1.0/24  # lan" in exported.stdout
    before = postwarden.entries("permitted")
    assert postwarden("lists", "remove", "permitted", "192.168.1.*", ".example.com",
                      "j@test.com").exit_code == 0  # fmt: skip
    assert postwarden.entries("permitted") == []
    back = postwarden("lists", "import", "permitted", "-", stdin=exported.stdout)
    assert back.exit_code == 0, back.output
    assert postwarden.entries("permitted") == before


def test_an_unusable_store_exits_1_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = tmp_path / "postwarden.toml"
    config.write_text(f'[store]\nurl = "sqlite://{blocker}/state.db"\n', encoding="utf-8")
    result = CliRunner().invoke(cli, ["--config", str(config), "lists", "show"])
    assert result.exit_code == 1
    assert "error:" in result.stderr and str(blocker) in result.stderr


def test_a_malformed_store_url_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "postwarden.toml"
    config.write_text('[store]\nurl = "sqlite://relative.db"\n', encoding="utf-8")
    result = CliRunner().invoke(cli, ["--config", str(config), "lists", "show"])
    assert result.exit_code == 2
    assert "absolute" in result.stderr


# --- import of untrusted files: bounded reading, sanitised errors ---------------------------


def _import_in_process(config: Path, source: str) -> subprocess.CompletedProcess[str]:
    """`lists import` in its own process, with a time limit: an unbounded read never ends."""
    return subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "--config", str(config),
         "lists", "import", "forbidden", source],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_import_of_dev_zero_ends_at_once_with_nothing_imported(postwarden: Postwarden) -> None:
    done = _import_in_process(postwarden.config, "/dev/zero")
    assert done.returncode == 2
    first, last = done.stderr.splitlines()
    assert first.startswith("error: /dev/zero:1: line longer than 4096 bytes: '\\x00\\x00")
    assert len(first) < 400
    assert last == "nothing imported"
    assert postwarden.entries("forbidden") == []


def test_a_100_mb_line_is_refused_without_reading_it(
    postwarden: Postwarden, tmp_path: Path
) -> None:
    source = tmp_path / "one-line.txt"
    with source.open("w") as out:
        out.write("192.0.2.1\n")
        for _ in range(100):
            out.write("a" * 1024 * 1024)
    started = time.monotonic()
    result = postwarden("lists", "import", "forbidden", str(source))
    assert time.monotonic() - started < 5
    assert result.exit_code == 2
    assert f"error: {source}:2: line longer than 4096 bytes: 'aaaa" in result.stderr
    assert max(len(line) for line in result.stderr.splitlines()) < 400
    assert postwarden.entries("forbidden") == []


def test_control_characters_are_escaped_and_do_not_split_lines(
    postwarden: Postwarden, tmp_path: Path
) -> None:
    source = tmp_path / "hostile.txt"
    source.write_bytes(
        b"192.0.2.1\n"
        b"foo\x0bbar.example\n"  # a vertical tab: one line, as sed and grep count them
        b"\x1b[2Jevil.example\x07\n"  # a terminal escape and a bell
        b"x\xe2\x80\xa8y.example\n"  # U+2028 LINE SEPARATOR
        b"10.0.0.1\n"
    )
    result = postwarden("lists", "import", "forbidden", str(source))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {source}:2: 'foo\\x0bbar.example': contains a space or a control character",
        f"error: {source}:3: '\\x1b[2Jevil.example\\x07': contains a space or a control character",
        f"error: {source}:4: 'x\\u2028y.example': contains a space or a control character",
        "3 bad line(s): nothing imported",
    ]
    assert postwarden.entries("forbidden") == []


def test_a_long_bad_line_is_shown_cut_to_80_characters(
    postwarden: Postwarden, tmp_path: Path
) -> None:
    source = tmp_path / "long.txt"
    source.write_text("b" * 2000 + ".example\n")
    result = postwarden("lists", "import", "forbidden", str(source))
    assert result.exit_code == 2
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"error: {source}:1: '{'b' * 80}'... (1928 more): ")
    assert len(first) < 400


def test_a_line_that_is_not_utf8_is_named_and_the_rest_still_checked(
    postwarden: Postwarden, tmp_path: Path
) -> None:
    source = tmp_path / "latin1.txt"
    source.write_bytes(b"192.0.2.1\n\xe9t\xe9.example\nnot-a-domain\n")
    result = postwarden("lists", "import", "forbidden", str(source))
    assert result.exit_code == 2
    assert f"error: {source}:2: b'\\xe9t\\xe9.example': not UTF-8 text" in result.stderr
    assert f"error: {source}:3: 'not-a-domain': " in result.stderr
    assert postwarden.entries("forbidden") == []


def test_a_file_over_the_size_limit_imports_nothing(
    postwarden: Postwarden, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands_lists, "MAX_IMPORT_BYTES", 1024 * 1024)
    source = tmp_path / "big.txt"
    source.write_text("10.0.0.1\n" * 120_000)  # 1.08 MB, every line good
    result = postwarden("lists", "import", "forbidden", str(source))
    assert result.exit_code == 2
    assert f"error: {source}: larger than 1 MiB; split it" in result.stderr
    assert postwarden.entries("forbidden") == []
