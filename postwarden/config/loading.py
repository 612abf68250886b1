"""Reading `postwarden.toml` and turning validation failures into one operator-readable error."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from postwarden.config.model import Config

DEFAULT_CONFIG_PATH = Path("/etc/postwarden/postwarden.toml")
CONFIG_ENV_VAR = "POSTWARDEN_CONFIG"
# A real postwarden.toml is a few KiB; more is a mistake (or /dev/zero) and is not read.
MAX_CONFIG_BYTES = 1024 * 1024
# tomllib's time grows with the square of a dotted key's parts (`a.a.a…= 1`: 20,000 parts
# take seconds), so a key with more parts than any real one is refused before parsing.
MAX_KEY_PARTS = 32
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_DEEP_KEY = re.compile(
    rf"(?:^|[{{,\[])[ \t]*(?:{_KEY_PART}[ \t]*\.[ \t]*){{{MAX_KEY_PARTS}}}{_KEY_PART}[ \t]*[.=\]]",
    re.MULTILINE,
)
_QUOTE_OR_COMMENT = re.compile(r"[\"'#]")
_BASIC_STRING_BODY = re.compile(r'(?:[^"\\\n]|\\.)*')


def _closing(text: str, quotes: str, start: int) -> int:
    """Just past the `quotes` (''' or \"\"\") closing a multi-line string; -1 if none."""
    end = start
    while (end := text.find(quotes, end)) >= 0:
        before = end
        while before > start and text[before - 1] == "\\":
            before -= 1
        if quotes == "'''" or (end - before) % 2 == 0:  # a literal string has no escapes
            end += 3
            extra = 0
            while extra < 2 and text.startswith(quotes[0], end):  # ''''' ends with two quotes
                end, extra = end + 1, extra + 1
            return end
        end += 1
    return -1


def _without_strings(text: str) -> str:
    """`text` with each string one token `""` and comments gone, in one linear pass."""
    out: list[str] = []
    pos = 0
    while found := _QUOTE_OR_COMMENT.search(text, pos):
        start = found.start()
        out.append(text[pos:start])
        if text.startswith("#", start):
            end = text.find("\n", start)
        else:
            out.append('""')
            if text.startswith(("'''", '"""'), start):
                end = _closing(text, text[start : start + 3], start + 3)
            elif text.startswith("'", start):
                line_end = text.find("\n", start)
                end = text.find("'", start + 1, len(text) if line_end < 0 else line_end)
                end = end + 1 if end >= 0 else line_end
            else:
                body = _BASIC_STRING_BODY.match(text, start + 1)
                end = body.end() if body else start + 1
                end += text.startswith('"', end)
        if end < 0:
            return "".join(out)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _has_deep_key(text: str) -> bool:
    # The quick check on the raw text finds every deep key, and in a real file nothing else;
    # only then are dots inside strings and comments told apart (a slower pass).
    return bool(_DEEP_KEY.search(text)) and bool(_DEEP_KEY.search(_without_strings(text)))


class ConfigError(Exception):
    """The config file cannot be used; `str()` names the file, the key and what is allowed."""

    def __init__(self, path: Path | None, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        where = str(path) if path is not None else "<config>"
        super().__init__("\n".join(f"{where}: {p}" for p in self.problems))


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to use: `--config`, else $POSTWARDEN_CONFIG, else the default path."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV_VAR)
    return Path(from_env) if from_env else DEFAULT_CONFIG_PATH


def _dotted(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _describe(error: Any) -> str:
    key = _dotted(error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling; see the config reference in README.md)"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    given = error.get("input")
    if isinstance(given, dict | list):
        # A check across several keys of a table: the message names them; the table itself
        # would only bury it.
        return f"{key}: {msg}"
    return f"{key} = {given!r}: {msg}"


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    """Validate an already-parsed TOML document."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, [_describe(e) for e in exc.errors()]) from None
    except RecursionError:
        raise ConfigError(path, ["arrays or tables nested too deeply"]) from None


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as file:
        raw = file.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            path, [f"larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB: not a config file"]
        )
    return raw


def parse_toml(text: str, path: Path | None = None) -> dict[str, Any]:
    """The TOML document in `text`; anything tomllib cannot take is one ConfigError."""
    if _has_deep_key(text):
        raise ConfigError(path, [f"not valid TOML: a key with more than {MAX_KEY_PARTS} parts"])
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError(path, ["not valid TOML: arrays or tables nested too deeply"]) from None
    except (ValueError, MemoryError) as exc:  # e.g. a 5000-digit integer; never a traceback
        raise ConfigError(
            path, [f"not valid TOML: {str(exc)[:200] or type(exc).__name__}"]
        ) from None


def load_config(path: str | os.PathLike[str] | None = None, *, missing_ok: bool = False) -> Config:
    """Load and validate the config file; a missing file with `missing_ok` gives the defaults."""
    resolved = config_path(path)
    try:
        raw = _read_bounded(resolved)
    except FileNotFoundError:
        if missing_ok:
            return Config()
        raise ConfigError(resolved, ["file not found"]) from None
    except OSError as exc:
        raise ConfigError(resolved, [f"cannot read: {exc.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(resolved, ["not UTF-8 text"]) from None
    return parse_config(parse_toml(text, resolved), resolved)
