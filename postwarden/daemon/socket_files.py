"""Unix socket files left behind: told apart from a server still listening there.

A daemon killed with SIGKILL (or a machine that lost power) leaves its socket file. The
next start must replace it, but never a socket another running server answers on.

Contract: docs/ARCHITECTURE.md, "Runtime conventions".
"""

from __future__ import annotations

import socket
import stat
from pathlib import Path


class SocketInUseError(Exception):
    """The path cannot be taken over: not a socket, or a server answers there."""


def remove_stale_socket(path: Path) -> None:
    """Unlink `path` if it is a socket nobody listens on; do nothing if it does not exist."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUseError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # stale: left by a daemon that did not exit cleanly
    else:
        raise SocketInUseError(f"{path}: another server is already listening there")
    finally:
        probe.close()
