"""The socketmap served on a unix socket, queried by Postfix's own client (`postmap -q`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from policyd.lookup_maps import socketmap_handler
from policyd.mailbox_probe import MailboxStatus, ProbeResult
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


class MemoryMailboxes:
    """Stands in for Dovecot's LMTP prober: a set of mailboxes, or one failure."""

    def __init__(self) -> None:
        self.mailboxes: set[str] = set()
        self.failure: ProbeResult | None = None
        self.asked: list[str] = []

    async def probe(self, address: str) -> ProbeResult:
        self.asked.append(address)
        if self.failure is not None:
            return self.failure
        found = address in self.mailboxes
        return ProbeResult(MailboxStatus.EXISTS if found else MailboxStatus.NO_SUCH_USER)


@dataclass
class Served:
    aliases: MemoryAliases
    mailboxes: MemoryMailboxes
    table: str
    config_dir: Path

    async def postmap(self, *keys: str, table: str | None = None) -> tuple[int, str]:
        """Run `postmap -q` (one key) or `postmap -q -` (keys on stdin, one connection)."""
        query = keys[0] if len(keys) == 1 else "-"
        proc = await asyncio.create_subprocess_exec(
            "postmap",
            "-c",
            str(self.config_dir),
            "-q",
            query,
            table or self.table,
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
    mailboxes = MemoryMailboxes()
    server = await asyncio.start_unix_server(socketmap_handler(aliases, mailboxes), path=str(sock))
    try:
        yield Served(aliases, mailboxes, f"socketmap:unix:{sock}:aliases", tmp_path)
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


async def test_postfix_reads_the_mailboxes_map_beside_the_aliases(served: Served) -> None:
    mailboxes = served.table.replace(":aliases", ":mailboxes")
    served.mailboxes.mailboxes.add("alice@example.test")
    served.aliases.aliases["sales@example.test"] = ["alice@example.test"]
    assert await served.postmap("alice@example.test", table=mailboxes) == (
        0,
        "alice@example.test\n",
    )
    assert await served.postmap("nobody@example.test", table=mailboxes) == (1, "")
    # Postfix's catch-all lookup is answered without asking Dovecot.
    assert await served.postmap("@example.test", table=mailboxes) == (1, "")
    assert served.mailboxes.asked == ["alice@example.test", "nobody@example.test"]
    # The same socket still serves the aliases.
    assert await served.postmap("sales@example.test") == (0, "alice@example.test\n")


async def test_dovecot_failure_is_a_temporary_lookup_error_for_postfix(served: Served) -> None:
    served.mailboxes.failure = ProbeResult.temporary("timeout", "no answer")
    rc, out = await served.postmap(
        "alice@example.test", table=served.table.replace(":aliases", ":mailboxes")
    )
    assert rc != 0
    assert "socketmap server temporary error: mailbox lookup in Dovecot failed: timeout" in out
