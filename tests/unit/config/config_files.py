"""A config file written for a test."""

from __future__ import annotations

from pathlib import Path


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "postwarden.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path
