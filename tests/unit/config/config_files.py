"""Configs written for a test: as a file, or as a model with a [mail] table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from postwarden.config.loading import parse_config
from postwarden.config.model import Config


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "postwarden.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def mail_config(**mail: Any) -> Config:
    """A config whose [mail] table holds `mail` beside a hostname and main domain."""
    return parse_config(
        {"mail": {"hostname": "mx.example.com", "main_domain": "example.com", **mail}}
    )
