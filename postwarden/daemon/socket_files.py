"""Listening sockets of the daemons, and unix socket files left behind by a killed one.

A daemon killed with SIGKILL (or a machine that lost power) leaves its socket file. The
next start must replace it, but never a socket another running server answers on. Unix
sockets get the configured mode and group, so that Postfix's smtpd can connect.

Contract: docs/ARCHITECTURE.md, "Runtime conventions".
"""

from __future__ import annotations

import grp
import os
import socket
import stat
from pathlib import Path

from postwarden.daemon.startup import StartupError
from postwarden.syntax.endpoints import ListenAddress

LISTEN_BACKLOG = 1024


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


def listening_socket(address: ListenAddress, mode: int, group: str | None) -> socket.socket:
    """A bound, listening socket for `address` (blocking); StartupError with the reason."""
    if address.kind == "unix":
        return _unix_socket(address, mode, group)
    return _inet_socket(address)


def _unix_socket(address: ListenAddress, mode: int, group: str | None) -> socket.socket:
    path = Path(address.path)
    try:
        remove_stale_socket(path)
    except SocketInUseError as exc:
        raise StartupError(str(exc)) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(LISTEN_BACKLOG)
    except KeyError:
        sock.close()
        raise StartupError(f"socket_group {group!r}: no such group") from None
    except OSError as exc:
        sock.close()
        raise StartupError(f"{path}: cannot listen: {exc.strerror}") from None
    return sock


def _inet_socket(address: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        return socket.create_server(
            (address.host, address.port), family=family, backlog=LISTEN_BACKLOG
        )
    except OSError as exc:
        raise StartupError(f"{address}: cannot listen: {exc.strerror}") from None
