"""`postwarden mapd` on a real Redis that is stopped mid-test, asked by Postfix's `postmap`.

An address mapd answered before the outage resolves as it did (an alias to its targets, a
plain mailbox address not found); only an address never asked gets Postfix's temporary
lookup error, so mail to known addresses goes on while Redis is down.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postwarden.store import open_store
from tests.fixtures import daemon_process
from tests.fixtures.mapd_daemon import start_mapd
from tests.fixtures.policyd_daemon import to_toml
from tests.fixtures.redis_server import RedisServer, start_redis_server, stop_redis_server

POSTMAP_TIMEOUT = 30.0


@dataclass
class MapdOnRedis:
    redis: RedisServer
    mapd: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path

    def postmap(self, key: str) -> tuple[int, str]:
        """`postmap -q key socketmap:unix:…:aliases`, Postfix's own socketmap client."""
        done = subprocess.run(
            [
                "postmap",
                "-c",
                str(self.socket_path.parent),
                "-q",
                key,
                f"socketmap:unix:{self.socket_path}:aliases",
            ],
            capture_output=True,
            text=True,
            timeout=POSTMAP_TIMEOUT,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr


@pytest.fixture
async def mapd_on_redis(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MapdOnRedis]:
    redis = start_redis_server(tmp_path_factory.mktemp("aliascache-redis"))
    # Short path: a unix socket path must stay under 108 bytes.
    directory = tmp_path_factory.mktemp("aliascache-mapd")
    (directory / "main.cf").write_text("")  # postmap needs one; empty is Postfix's defaults
    socket_path = directory / "aliases.sock"
    config_path = directory / "postwarden.toml"
    config: dict[str, dict[str, Any]] = {
        "store": {"url": redis.url, "timeout": 0.5},
        "policyd": {"aliases_listen": f"unix:{socket_path}", "log_level": "info"},
    }
    config_path.write_text(to_toml(config), encoding="utf-8")
    store = open_store(redis.url)
    mapd = None
    try:
        await store.set_alias("sales@example.test", ["j.smith@example.test", "r@x.test"])
        mapd = start_mapd(config_path, socket_path)
        yield MapdOnRedis(redis, mapd, socket_path, directory / "mapd.log")
    finally:
        await store.close()
        if mapd is not None:
            daemon_process.stop(mapd)
        stop_redis_server(redis.process)


@pytest.mark.expect_log(r"socketmap: aliases: store unavailable")
def test_with_redis_stopped_addresses_answered_before_still_resolve(
    mapd_on_redis: MapdOnRedis,
) -> None:
    m = mapd_on_redis
    assert m.postmap("sales@example.test") == (0, "j.smith@example.test,r@x.test\n")
    assert m.postmap("alice@example.test") == (1, "")  # a mailbox, not an alias

    stop_redis_server(m.redis.process)

    # Each postmap is a new connection: the answers are the process's, not a connection's.
    assert m.postmap("sales@example.test") == (0, "j.smith@example.test,r@x.test\n")
    assert m.postmap("alice@example.test") == (1, "")
    rc, out = m.postmap("never-asked@example.test")
    # A temporary error, not "not found": Postfix defers the mail instead of bouncing it.
    assert rc != 0
    assert "socketmap server temporary error: store unavailable" in out
    log = m.log_path.read_text()
    assert log.count("answering from the last known answers") == 1, log
