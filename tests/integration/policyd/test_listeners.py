"""The listening sockets: a live socket is never taken over, a stale one is replaced."""

from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.policyd_daemon import (
    POSTWARDEN,
    StartPolicyd,
    start_policyd,
)


def test_second_daemon_on_a_live_socket_refuses_to_start(
    policyd_daemon: StartPolicyd, tmp_path: Path
) -> None:
    first = policyd_daemon(tcp=False)
    config = tmp_path / "second.toml"
    config.write_text(
        f'[store]\nurl = "sqlite://{tmp_path / "s.db"}"\n'
        f'[policyd]\nlisten = ["unix:{first.socket_path}"]\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [POSTWARDEN, "--config", str(config), "policyd"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "another server is already listening" in result.stderr
    assert "Traceback" not in result.stderr
    assert first.process.poll() is None


def test_stale_socket_file_is_replaced_with_configured_mode_and_group(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    directory = tmp_path_factory.mktemp("stale")
    stale = directory / "policyd.sock"
    import socket

    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # the file stays, nobody listens: what a killed daemon leaves
    group = grp.getgrgid(os.getgid()).gr_name
    handle = start_policyd(
        directory, {"policyd": {"socket_mode": "0640", "socket_group": group}}, tcp=False
    )
    try:
        assert handle.socket_path == stale
        assert oct(stale.stat().st_mode & 0o777) == "0o640"
        assert stale.stat().st_gid == os.getgid()
    finally:
        assert handle.stop() == 0
