"""The socketmap served on a unix socket, queried by Postfix's own client (`postmap -q`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from policyd.socketmap import socketmap_handler
from postwarden.store.base import StoreError

POSTMAP_TIMEOUT = 10.0


class MemoryAliases:
    """The alias part of the store, changeable while the server runs."""

    def __init__(self) -> None:
        self.aliases: dict[str, list[str]] = {}
        self.down = False

    async def get_alias(self, address: str) -> list[str] | None:
        if self.down:
            raise StoreError("store unreachable")
        return self.aliases.get(address)


@dataclass
class Served:
    aliases: MemoryAliases
    table: str
    config_dir: Path

    async def postmap(self, *keys: str) -> tuple[int, str]:
        """Run `postmap -q` (one key) or `postmap -q -` (keys on stdin, one connection)."""
        query = keys[0] if len(keys) == 1 else "-"
        proc = await asyncio.create_subprocess_exec(
            "postmap",
            "-c",
            str(self.config_dir),
            "-q",
            query,
            self.table,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        stdin = "".join(f"{k}\n" for k in keys).encode() if len(keys) > 1 else b""
        out, _ = await asyncio.wait_for(proc.communicate(stdin), POSTMAP_TIMEOUT)
        assert proc.returncode is not None
        return proc.returncode, out.decode()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    # postmap needs a main.cf; an empty one means Postfix's built-in defaults.
    (tmp_path / "main.cf").write_text("")
    sock = tmp_path / "aliases.sock"
    aliases = MemoryAliases()
    server = await asyncio.start_unix_server(socketmap_handler(aliases), path=str(sock))
    try:
        yield Served(aliases, f"socketmap:unix:{sock}:aliases", tmp_path)
    finally:
        server.close()
        await server.wait_closed()


async def test_postfix_reads_group_alias_as_comma_list(served: Served) -> None:
    served.aliases.aliases["sales@example.test"] = [
        "j.smith@example.test",
        "r.johnson@example.test",
    ]
    assert await served.postmap("sales@example.test") == (
        0,
        "j.smith@example.test,r.johnson@example.test\n",
    )


async def test_unknown_address_is_not_found(served: Served) -> None:
    assert await served.postmap("nobody@example.test") == (1, "")


async def test_change_applies_to_the_next_lookup_without_reload(served: Served) -> None:
    assert (await served.postmap("ceo@example.test"))[0] == 1
    served.aliases.aliases["ceo@example.test"] = ["ceo@gmail.example"]
    assert await served.postmap("ceo@example.test") == (0, "ceo@gmail.example\n")


async def test_many_keys_over_one_connection(served: Served) -> None:
    served.aliases.aliases.update(
        {"manager@example.test": ["r.johnson@example.test"], "b@example.test": ["c@x.test"]}
    )
    rc, out = await served.postmap("manager@example.test", "none@example.test", "b@example.test")
    assert rc == 0
    assert out.splitlines() == [
        "manager@example.test\tr.johnson@example.test",
        "b@example.test\tc@x.test",
    ]


async def test_store_down_is_a_temporary_lookup_error_for_postfix(served: Served) -> None:
    served.aliases.down = True
    rc, out = await served.postmap("sales@example.test")
    # A temporary error, not "not found": Postfix defers the mail instead of bouncing it.
    assert rc != 0
    assert "socketmap server temporary error: store unavailable" in out
    assert "query error" in out
