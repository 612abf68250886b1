"""The listening sockets of policyd: bound once, before any fork, shared by the workers.

Unix sockets get the configured mode and group; a socket file left by a killed daemon is
replaced, one a live server answers on is not (postwarden/daemon/socket_files.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from postwarden.config import Config
from postwarden.config.types import ListenAddress
from postwarden.daemon.socket_files import listening_socket
from postwarden.daemon.startup import StartupError

# What one policyd process serves: both, the policy only, or the lookup maps only (mapd).
Served = Literal["all", "policy", "maps"]


@dataclass
class Listener:
    """A bound, listening socket and what it was made from."""

    address: ListenAddress
    sock: socket.socket
    # "policy" (check_policy_service) or "socketmap" (aliases and mailboxes, lookup_maps.py).
    role: str = "policy"


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
            sock = listening_socket(address, mode, cfg.policyd.socket_group)
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
