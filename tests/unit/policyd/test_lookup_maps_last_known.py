"""The aliases map's last known answers: what a store outage is answered with."""

from __future__ import annotations

import asyncio
import logging

import pytest

from policyd.lookup_maps import (
    ALIASES_MAP,
    LAST_KNOWN_KEY_LENGTH,
    REPEAT_LOG_INTERVAL,
    AliasMap,
    MailboxMap,
    answer,
)
from policyd.mailbox_probe import MailboxStatus, ProbeResult
from policyd.socketmap_codec import NOT_FOUND, SocketmapReply, SocketmapRequest
from postwarden.store.base import StoreError

REFUSED = StoreError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


class SwitchableStore:
    """The alias part of a store that can be made to fail or hang, and changed meanwhile."""

    def __init__(self, aliases: dict[str, list[str]]) -> None:
        self.aliases = aliases
        self.fail: StoreError | None = None
        self.hang = False

    async def get_alias(self, address: str) -> list[str] | None:
        if self.hang:
            await asyncio.get_running_loop().create_future()  # never answers
        if self.fail is not None:
            raise self.fail
        return self.aliases.get(address)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _ask(
    key: str, store: SwitchableStore, aliases: AliasMap, timeout: float = 1.0
) -> SocketmapReply:
    return await answer(SocketmapRequest(ALIASES_MAP, key), store, timeout, None, aliases)


async def test_a_key_answered_before_gets_the_same_answer_while_the_store_is_down() -> None:
    store = SwitchableStore({"sales@example.test": ["j.smith@example.test"]})
    aliases = AliasMap()
    assert await _ask("sales@example.test", store, aliases) == SocketmapReply(
        "OK", "j.smith@example.test"
    )
    assert await _ask("alice@example.test", store, aliases) == NOT_FOUND
    store.fail = REFUSED
    # Case folded as before: Postfix may ask in another case.
    assert await _ask("Sales@Example.TEST", store, aliases) == SocketmapReply(
        "OK", "j.smith@example.test"
    )
    # A plain mailbox is NOTFOUND in the aliases map: still so, not TEMP.
    assert await _ask("alice@example.test", store, aliases) == NOT_FOUND
    assert aliases.known.served == 2


async def test_a_key_never_answered_is_temp_while_the_store_is_down() -> None:
    store = SwitchableStore({"sales@example.test": ["j.smith@example.test"]})
    aliases = AliasMap()
    await _ask("sales@example.test", store, aliases)
    store.fail = REFUSED
    assert await _ask("new@example.test", store, aliases) == SocketmapReply(
        "TEMP", "store unavailable"
    )
    assert aliases.known.served == 0


async def test_a_store_that_times_out_is_answered_from_the_last_known_answers() -> None:
    store = SwitchableStore({"sales@example.test": ["j.smith@example.test"]})
    aliases = AliasMap()
    await _ask("sales@example.test", store, aliases)
    await _ask("alice@example.test", store, aliases)
    store.hang = True
    # A timeout of 0 expires at the next loop turn: the test never waits in real time.
    assert await _ask("sales@example.test", store, aliases, timeout=0) == SocketmapReply(
        "OK", "j.smith@example.test"
    )
    assert await _ask("alice@example.test", store, aliases, timeout=0) == NOT_FOUND
    assert (await _ask("new@example.test", store, aliases, timeout=0)).status == "TIMEOUT"


async def test_once_the_store_answers_its_answer_replaces_the_remembered_one() -> None:
    store = SwitchableStore({"sales@example.test": ["j.smith@example.test"]})
    aliases = AliasMap()
    await _ask("sales@example.test", store, aliases)
    await _ask("ceo@example.test", store, aliases)
    store.fail = REFUSED
    store.aliases = {
        "sales@example.test": ["r.johnson@example.test"],
        "ceo@example.test": ["x@y.test"],
    }
    # Changed during the outage: served stale until the store is back, never longer.
    assert (await _ask("sales@example.test", store, aliases)).data == "j.smith@example.test"
    store.fail = None
    assert (await _ask("sales@example.test", store, aliases)).data == "r.johnson@example.test"
    assert (await _ask("ceo@example.test", store, aliases)).data == "x@y.test"
    del store.aliases["sales@example.test"]
    assert await _ask("sales@example.test", store, aliases) == NOT_FOUND
    store.fail = REFUSED
    # The newest answers are what an outage is answered with.
    assert await _ask("sales@example.test", store, aliases) == NOT_FOUND
    assert (await _ask("ceo@example.test", store, aliases)).data == "x@y.test"


async def test_the_least_recently_answered_key_is_forgotten_first() -> None:
    store = SwitchableStore({f"a{i}@example.test": [f"t{i}@example.test"] for i in range(3)})
    aliases = AliasMap(limit=2)
    await _ask("a0@example.test", store, aliases)
    await _ask("a1@example.test", store, aliases)
    await _ask("a0@example.test", store, aliases)  # answered again: now the newest
    await _ask("a2@example.test", store, aliases)  # over the limit: a1 goes
    assert len(aliases.known) == 2
    store.fail = REFUSED
    assert (await _ask("a0@example.test", store, aliases)).status == "OK"
    assert (await _ask("a2@example.test", store, aliases)).status == "OK"
    assert (await _ask("a1@example.test", store, aliases)).status == "TEMP"


async def test_many_unknown_recipients_never_push_out_an_alias() -> None:
    store = SwitchableStore({"sales@example.test": ["j.smith@example.test"]})
    aliases = AliasMap(limit=3)
    await _ask("sales@example.test", store, aliases)
    for i in range(10):  # a client trying addresses: each one NOTFOUND
        await _ask(f"guess{i}@example.test", store, aliases)
    assert len(aliases.known) == 4  # the alias, and the 3 newest of the rest
    store.fail = REFUSED
    assert (await _ask("sales@example.test", store, aliases)).status == "OK"
    assert await _ask("guess9@example.test", store, aliases) == NOT_FOUND
    assert (await _ask("guess0@example.test", store, aliases)).status == "TEMP"


async def test_a_key_longer_than_an_address_is_not_remembered() -> None:
    store = SwitchableStore({})
    aliases = AliasMap()
    long_key = "a" * LAST_KNOWN_KEY_LENGTH + "@example.test"
    assert await _ask(long_key, store, aliases) == NOT_FOUND
    assert len(aliases.known) == 0
    store.fail = REFUSED
    assert (await _ask(long_key, store, aliases)).status == "TEMP"


async def test_the_remembered_answer_is_the_one_with_only_deliverable_targets() -> None:
    class Prober:
        async def probe(self, address: str) -> ProbeResult:
            found = address == "alice@example.test"
            return ProbeResult(MailboxStatus.EXISTS if found else MailboxStatus.NO_SUCH_USER)

    store = SwitchableStore({"team@example.test": ["bob@example.test", "alice@example.test"]})
    mailboxes = MailboxMap(Prober(), local_domains=["example.test"])
    aliases = AliasMap()
    request = SocketmapRequest(ALIASES_MAP, "team@example.test")
    assert (await answer(request, store, 1.0, mailboxes, aliases)).data == "alice@example.test"
    store.fail = REFUSED
    # bob (deleted) is not brought back by the outage.
    assert (await answer(request, store, 1.0, mailboxes, aliases)).data == "alice@example.test"


async def test_an_outage_is_one_warning_saying_what_is_answered_and_one_recovery_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "postwarden.socketmap")
    clock = FakeClock()
    store = SwitchableStore({"sales@example.test": ["j.smith@example.test"]})
    aliases = AliasMap(clock=clock)
    await _ask("sales@example.test", store, aliases)
    await _ask("alice@example.test", store, aliases)
    store.fail = REFUSED
    for _ in range(20):
        await _ask("sales@example.test", store, aliases)
        await _ask("new@example.test", store, aliases)
        clock.now += 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "socketmap: aliases: store unavailable: Error 111 connecting to 127.0.0.1:6379. "
        "Connection refused.; answering from the last known answers (2 keys; TEMP for a key "
        "never answered) until it works again"
    ]
    clock.now += REPEAT_LOG_INTERVAL
    await _ask("alice@example.test", store, aliases)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert (
        "41 lookups failed so far, 21 lookups answered from the last known answers" in (warnings[1])
    )
    store.fail = None
    await _ask("sales@example.test", store, aliases)
    await _ask("sales@example.test", store, aliases)
    recovered = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert recovered == [
        "socketmap: aliases: works again (lookups failed: store unavailable: 41; answered "
        "from the last known answers: 21)"
    ]
    # A second outage counts afresh in its lines; known.served counts since the start.
    store.fail = REFUSED
    await _ask("sales@example.test", store, aliases)
    clock.now += REPEAT_LOG_INTERVAL
    await _ask("sales@example.test", store, aliases)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "2 lookups failed so far, 2 lookups answered from the last known answers" in (warnings[-1])
    )
    assert aliases.known.served == 23


async def test_a_store_error_text_in_the_warning_is_sanitised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SwitchableStore({})
    store.fail = StoreError("refused\nFAKE LOG LINE")
    await _ask("a@example.test", store, AliasMap())
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "\n" not in record.getMessage()
