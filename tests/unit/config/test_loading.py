"""Reading postwarden.toml (config/loading.py): one error naming file, key and rule.

Hostile files (deep nesting, huge keys and numbers, oversized files) are bounded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from postwarden.config import Config, ConfigError, load_config
from tests.unit.config.config_files import write

DEEP = 5000  # far past the interpreter's recursion limit (1000)

DOTS = "a, " + "b." * 40 + "c"


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


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[greylisting]\ndelay = -1\nexpiry = -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert len(caught.value.problems) == 2


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
