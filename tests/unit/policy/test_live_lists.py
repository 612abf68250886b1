"""The lists a daemon matches against, kept in step with the store (policy/live_lists.py)."""

from __future__ import annotations

import asyncio

from postwarden.policy.list_entries import parse_entry
from postwarden.policy.live_lists import LiveLists, keep_lists_fresh
from postwarden.policy.records import (
    ListEntry,
    ListName,
)
from tests.unit.policy.fake_store import FakeStore

CLIENT = "192.0.2.10"


async def test_live_lists_pick_up_additions_and_removals() -> None:
    store = FakeStore()
    live = LiveLists()
    await live.reload(store)
    await store.add_list_entries([ListEntry(ListName.FORBIDDEN, parse_entry("192.0.2.10"))])
    assert await live.refresh(store)
    assert live.current.forbidden.contains_ip(CLIENT)
    assert not await live.refresh(store)  # nothing new: one cheap version poll
    await store.remove_list_entries(ListName.FORBIDDEN, [parse_entry("192.0.2.10")])
    await live.refresh(store)
    assert not live.current.forbidden.contains_ip(CLIENT)


async def test_live_lists_reload_everything_when_the_change_log_is_gone() -> None:
    store = FakeStore()
    live = LiveLists()
    await live.reload(store)
    await store.add_list_entries([ListEntry(ListName.PERMITTED, parse_entry("example.org"))])
    store.forget_log = True
    await live.refresh(store)
    assert live.current.permitted.contains_domain("example.org")
    assert live.version == 1


async def test_store_outage_keeps_the_last_good_lists() -> None:
    store = FakeStore()
    await store.add_list_entries([ListEntry(ListName.FORBIDDEN, parse_entry("192.0.2.0/24"))])
    live = LiveLists()
    await live.reload(store)
    store.failing = True
    store.calls.clear()
    # Interval 0: the refresher only yields between refreshes, so the test never waits.
    task = asyncio.create_task(keep_lists_fresh(live, store, 0))
    for _ in range(100):
        if store.calls.count("version") >= 3:
            break
        await asyncio.sleep(0)
    assert store.calls.count("version") >= 3  # three refreshes failed meanwhile
    assert live.current.forbidden.contains_ip(CLIENT)
    store.failing = False
    await store.add_list_entries([ListEntry(ListName.FORBIDDEN, parse_entry("198.51.100.7"))])
    for _ in range(100):
        if live.current.forbidden.contains_ip("198.51.100.7"):
            break
        await asyncio.sleep(0)
    task.cancel()
    assert live.current.forbidden.contains_ip("198.51.100.7")
    assert live.current.forbidden.contains_ip(CLIENT)


async def test_a_full_reload_leaves_the_event_loop_answering() -> None:
    store = FakeStore()
    rows = [
        ListEntry(ListName.FORBIDDEN, f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        for n in range(30_000)
    ]
    await store.add_list_entries(rows)
    live = LiveLists()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    await live.reload(store)  # the fake store never yields: only the compiling thread lets go
    task.cancel()
    assert live.current.forbidden.contains_ip("10.0.117.47")
    assert ticks - before > 1


async def test_lists_unreachable_at_start_are_loaded_on_first_refresh() -> None:
    store = FakeStore()
    await store.add_list_entries([ListEntry(ListName.FORBIDDEN, parse_entry("192.0.2.0/24"))])
    live = LiveLists()  # as the server does when the store was down at start
    assert await live.refresh(store)
    assert live.current.forbidden.contains_ip(CLIENT)
