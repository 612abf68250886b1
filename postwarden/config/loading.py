"""Reading `postwarden.toml` and turning validation failures into one operator-readable error."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from postwarden.config.model import Config

DEFAULT_CONFIG_PATH = Path("/etc/postwarden/postwarden.toml")
CONFIG_ENV_VAR = "POSTWARDEN_CONFIG"


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


def load_config(path: str | os.PathLike[str] | None = None, *, missing_ok: bool = False) -> Config:
    """Load and validate the config file; a missing file with `missing_ok` gives the defaults."""
    resolved = config_path(path)
    try:
        raw = resolved.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return Config()
        raise ConfigError(resolved, ["file not found"]) from None
    except OSError as exc:
        raise ConfigError(resolved, [f"cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(resolved, ["not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(resolved, [f"not valid TOML: {exc}"]) from None
    return parse_config(data, resolved)
