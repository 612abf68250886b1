"""The layering rule of docs/ARCHITECTURE.md ("Layers"), checked on the import statements.

Imports point inward only: the core (`postwarden/`) never imports an adapter (`policyd`,
`milterd`, `cli`), and the pure modules never import the storage layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "postwarden"
ADAPTERS = ("policyd", "milterd", "cli")
# Modules that do I/O around the core; everything else under postwarden/ is pure.
IO_MODULES = (
    "postwarden/store/",
    "postwarden/policy/pipeline.py",
    "postwarden/policy/live_lists.py",
    "postwarden/daemon/",
    "postwarden/appliance/",
    "postwarden/dns/",
)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", _core_modules(), ids=_relative)
def test_the_core_never_imports_an_adapter(path: Path) -> None:
    outward = {m for m in _imported_modules(path) if m.split(".")[0] in ADAPTERS}
    assert not outward, f"{_relative(path)} imports {sorted(outward)}"


@pytest.mark.parametrize(
    "path",
    [p for p in _core_modules() if not _relative(p).startswith(IO_MODULES)],
    ids=_relative,
)
def test_pure_modules_never_import_the_store(path: Path) -> None:
    storage = {m for m in _imported_modules(path) if m.startswith("postwarden.store")}
    assert not storage, f"{_relative(path)} imports {sorted(storage)}"


def test_the_checker_sees_imports() -> None:
    # Guards the guard: a module known to import the store is seen doing so.
    assert "postwarden.store.base" in _imported_modules(CORE / "policy" / "pipeline.py")


def test_no_two_modules_share_a_name() -> None:
    names: dict[str, list[str]] = {}
    for package in ("postwarden", *ADAPTERS):
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "__init__.py":
                names.setdefault(path.name, []).append(_relative(path))
    shared = {name: paths for name, paths in names.items() if len(paths) > 1}
    assert not shared, shared
