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
from typing import Literal

from postwarden.config import Config
from postwarden.config.types import ListenAddress
from postwarden.daemon.socket_files import SocketInUseError, remove_stale_socket
from postwarden.daemon.startup import StartupError

LISTEN_BACKLOG = 1024
# What one policyd process serves: both, the policy only, or the lookup maps only (mapd).
Served = Literal["all", "policy", "maps"]


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


def wanted_listeners(cfg: Config, served: Served) -> list[tuple[ListenAddress, str]]:
    """The addresses (and their roles) a process serving `served` binds.

    "all" is `postwarden policyd`; "policy" is `policyd --no-maps`, beside a `mapd`
    ("maps") that serves the lookup maps in a process of its own, so that Postfix's address
    resolution does not stop while policyd is down (docs/ARCHITECTURE.md, "What each
    daemon owns").
    """
    wanted: list[tuple[ListenAddress, str]] = []
    if served in ("all", "policy"):
        wanted.extend((address, "policy") for address in cfg.policyd.listen)
    if served in ("all", "maps") and cfg.policyd.aliases_listen is not None:
        wanted.append((cfg.policyd.aliases_listen, "socketmap"))
    return wanted


def bind_listeners(cfg: Config, served: Served = "all") -> list[Listener]:
    """Bind the addresses `served` needs (before any fork, so workers share them)."""
    mode = int(cfg.policyd.socket_mode, 8)
    listeners: list[Listener] = []
    wanted = wanted_listeners(cfg, served)
    try:
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
