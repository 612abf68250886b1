"""The listening sockets of policyd: bound once, before any fork, shared by the workers.

Unix sockets get the configured mode and group; a socket file left by a killed daemon is
replaced, one a live server answers on is not (postwarden/daemon/socket_files.py).
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from postwarden.config import Config
from postwarden.config.types import ListenAddress
from postwarden.daemon.socket_files import SocketInUseError, remove_stale_socket
from postwarden.daemon.startup import StartupError

LISTEN_BACKLOG = 1024


@dataclass
class Listener:
    """A bound, listening socket and what it was made from."""

    address: ListenAddress
    sock: socket.socket
    # "policy" (check_policy_service) or "socketmap" (aliases and mailboxes, lookup_maps.py).
    role: str = "policy"


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


def bind_listeners(cfg: Config) -> list[Listener]:
    """Bind every `policyd.listen` address (before any fork, so workers share them)."""
    mode = int(cfg.policyd.socket_mode, 8)
    listeners: list[Listener] = []
    try:
        wanted = [(address, "policy") for address in cfg.policyd.listen]
        if cfg.policyd.aliases_listen is not None:
            wanted.append((cfg.policyd.aliases_listen, "socketmap"))
        for address, role in wanted:
            if address.kind == "unix":
                sock = _unix_socket(address, mode, cfg.policyd.socket_group)
            else:
                sock = _inet_socket(address)
            sock.setblocking(False)
            listeners.append(Listener(address, sock, role))
    except StartupError:
        close_listeners(listeners)
        raise
    return listeners


def close_listeners(listeners: Sequence[Listener]) -> None:
    for listener in listeners:
        listener.sock.close()
        if listener.address.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(listener.address.path)
