"""A wheel built from the checkout, installed into a fresh venv, renders files that the real
`postfix check` and `doveconf -n` accept: the templates and the shipped large-sender list are
package data, not files found next to a source tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.integration.appliance.test_render import rich_config, run

CHECKOUT = Path(__file__).resolve().parents[3]
# What the wheel is built from (as scripts/install.sh copies it): a clean copy, so nothing
# a previous build left in the checkout (build/, *.egg-info) ends up in this wheel.
PACKAGING_INPUTS = (
    "pyproject.toml",
    "README.md",
    "postwarden",
    "policyd",
    "milterd",
    "cli",
    "postfix-config",
    "dovecot-config",
)
BUILD_TIMEOUT = 300  # seconds; the build backend may come from pip's cache or the index


def _copy_checkout(target: Path) -> Path:
    target.mkdir()
    for name in PACKAGING_INPUTS:
        source = CHECKOUT / name
        if source.is_dir():
            # symlinks=True: the package's templates/ links stay links, as in a git clone.
            shutil.copytree(
                source,
                target / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        elif source.exists():
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding only the built wheel; the dependencies come from this venv."""
    root = tmp_path_factory.mktemp("wheel")
    source = _copy_checkout(root / "src")
    dist = root / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = dist.glob("postwarden-*.whl")
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    # The dependencies: this venv's site-packages, after the fresh venv's own (a .pth line
    # adds the directory only; the editable install's own .pth hook there is not run).
    venv_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
    )
    (venv_site / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run(
        [
            *pip,
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    return venv


def test_the_installed_wheel_is_what_runs_not_the_checkout(wheel_venv: Path) -> None:
    probe = (
        "import postwarden.appliance.render as r, postwarden.policy as p; "
        "from importlib import resources; "
        "print(r.__file__); "
        "print(len(resources.files(p).joinpath('data/large_senders.txt').read_text()))"
    )
    # -I: not the working directory (the checkout) first on sys.path.
    done = run([str(wheel_venv / "bin" / "python"), "-I", "-c", probe])
    assert done.returncode == 0, done.stderr
    module_file, large_senders_size = done.stdout.split()
    assert Path(module_file).is_relative_to(wheel_venv), module_file
    assert int(large_senders_size) > 0


def test_the_installed_wheel_renders_files_postfix_and_dovecot_accept(
    wheel_venv: Path, tmp_path: Path
) -> None:
    config = rich_config(tmp_path)
    staging = tmp_path / "staging"
    rendered = run(
        [
            str(wheel_venv / "bin" / "postwarden"),
            "--config",
            str(config),
            "config",
            "render",
            "--to",
            str(staging),
        ]
    )
    assert rendered.returncode == 0, rendered.stderr
    tmp_path.chmod(0o755)  # postfix check's helpers drop privileges
    postfix = run(["postfix", "-c", str(staging / "postfix"), "check"])
    assert postfix.returncode == 0, postfix.stderr
    assert "warning" not in postfix.stderr, postfix.stderr
    dovecot = run(["doveconf", "-n", "-c", str(staging / "dovecot" / "dovecot.conf")])
    assert dovecot.returncode == 0, dovecot.stderr
    assert "Warning" not in dovecot.stderr and "Fatal" not in dovecot.stderr, dovecot.stderr
    assert "postmaster_address = ops@example.com" in dovecot.stdout
