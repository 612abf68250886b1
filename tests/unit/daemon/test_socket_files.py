"""A socket file left by a killed daemon is replaced; a live one, or a non-socket, never."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from postwarden.daemon.socket_files import SocketInUseError, remove_stale_socket


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "d.sock"


def test_a_missing_path_is_fine(socket_path: Path) -> None:
    remove_stale_socket(socket_path)
    assert not socket_path.exists()


def test_a_socket_nobody_listens_on_is_removed(socket_path: Path) -> None:
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(socket_path))
    left.close()  # the file stays, as after SIGKILL
    assert socket_path.exists()
    remove_stale_socket(socket_path)
    assert not socket_path.exists()


def test_a_socket_a_server_listens_on_is_never_taken_over(socket_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(socket_path))
    server.listen()
    try:
        with pytest.raises(SocketInUseError, match="already listening"):
            remove_stale_socket(socket_path)
        assert socket_path.exists()
    finally:
        server.close()


def test_a_regular_file_is_never_removed(socket_path: Path) -> None:
    socket_path.write_text("operator's file")
    with pytest.raises(SocketInUseError, match="not a socket"):
        remove_stale_socket(socket_path)
    assert socket_path.read_text() == "operator's file"
