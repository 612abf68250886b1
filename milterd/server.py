"""Run milterd: load config and keys once, open the socket, serve until SIGTERM.

libmilter (under pymilter) runs one thread per MTA connection and listens on one socket
per process. A unix socket is the default and the recommendation: libmilter sets no
TCP_NODELAY, so over TCP every message stalls ~40 ms (Nagle + delayed ACK). libmilter
itself catches SIGTERM/SIGINT/SIGHUP and stops cleanly: its accept loop notices within
5 seconds, messages in progress finish, and `Milter.runmilter` returns.
"""

from __future__ import annotations

import grp
import logging
import os
import sys
import threading
import time
from pathlib import Path

import Milter

from milterd.engine import Engine
from milterd.milter import DkimMilter
from postwarden.config.model import Config
from postwarden.config.types import ListenAddress

log = logging.getLogger("postwarden.milterd")
MILTER_NAME = "postwarden-milterd"
# Seconds libmilter waits on a silent MTA connection before dropping it.
MTA_TIMEOUT = 600
SOCKET_WAIT = 10.0


class MilterdStartError(Exception):
    """The milter cannot start as configured (socket, group, listen addresses)."""


def socket_spec(address: ListenAddress) -> str:
    """libmilter's socket syntax: `unix:/path`, `inet:port@host`, `inet6:port@host`."""
    if address.kind == "unix":
        return f"unix:{address.path}"
    family = "inet6" if ":" in address.host else "inet"
    return f"{family}:{address.port}@{address.host}"


def _socket_permissions(path: Path, mode: int, group: str | None) -> None:
    # libmilter creates the socket inside runmilter; wait for it (bounded), then set owner.
    deadline = time.monotonic() + SOCKET_WAIT
    while not path.exists():
        if time.monotonic() > deadline:
            log.error("socket %s did not appear within %.0fs", path, SOCKET_WAIT)
            return
        time.sleep(0.01)
    try:
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, mode)
    except (OSError, KeyError) as exc:
        log.error("cannot set group/mode of %s: %s", path, exc)


def run(config: Config) -> int:
    """Serve until stopped; returns the process exit code."""
    cfg = config.milterd
    if len(cfg.listen) != 1:
        raise MilterdStartError(
            "milterd.listen: libmilter serves one socket per process; give exactly one "
            f"(got {', '.join(str(a) for a in cfg.listen)})"
        )
    address = cfg.listen[0]
    mode = int(cfg.socket_mode, 8)
    if cfg.socket_group is not None:
        try:
            grp.getgrnam(cfg.socket_group)
        except KeyError:
            raise MilterdStartError(
                f"milterd.socket_group: no group {cfg.socket_group!r}"
            ) from None
    DkimMilter.engine = Engine(config)
    Milter.factory = DkimMilter
    if address.kind == "unix":
        path = Path(address.path)
        if not path.parent.is_dir():
            raise MilterdStartError(f"milterd.listen: directory {path.parent} does not exist")
        # Umask and effective group make the socket born with the configured mode and group:
        # no window in which Postfix (in that group) is refused, or others are let in.
        os.umask(0o777 & ~mode)
        if cfg.socket_group is not None and os.geteuid() == 0:
            os.setegid(grp.getgrnam(cfg.socket_group).gr_gid)
        elif cfg.socket_group is not None:
            # Not root: chgrp once the socket exists (to a group this user is in). The thread
            # is short-lived: libmilter blocks SIGTERM only in threads started after it.
            threading.Thread(
                target=_socket_permissions, args=(path, mode, cfg.socket_group), daemon=True
            ).start()
    keys = sum(len(k) for k in DkimMilter.engine.keys.values())
    log.info(
        "milterd listening on %s (%d signing keys, sign=%s verify=%s, authserv-id %s)",
        address,
        keys,
        config.dkim.sign,
        config.dkim.verify,
        DkimMilter.engine.server_id,
    )
    sys.stderr.flush()
    try:
        Milter.runmilter(MILTER_NAME, socket_spec(address), MTA_TIMEOUT)
    except Milter.milter.error as exc:
        raise MilterdStartError(f"cannot serve on {address}: {exc}") from None
    log.info("milterd stopped")
    return 0
