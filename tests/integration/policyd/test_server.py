"""The real `postwarden policyd` process on a unix socket and TCP, driven as Postfix drives it."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from postwarden.policy.records import ListEntry, ListName
from postwarden.store import open_store
from tests.fixtures.policyd_daemon import (
    POSTWARDEN,
    StartPolicyd,
)
from tests.integration.policyd.policy_client import (
    ANSWER_TIMEOUT,
    DEFER,
    DUNNO,
    ask,
    ask_once,
    closed_by_server,
    open_client,
    request,
)


async def test_keep_alive_connection_serves_many_requests(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon()
    for tcp in (False, True):
        reader, writer = await open_client(daemon, tcp=tcp)
        for i in range(200):
            reply = await ask(reader, writer, request(recipient=f"user{i}-{tcp}@example.com"))
            assert reply == DEFER
        writer.close()
    # Decision lines are written in batches (at least every 0.1 s), in order.
    logs = daemon.wait_for_log("to=<user199-True@example.com>")
    assert logs.count("rule=greylist_defer") == 400


async def test_every_decision_is_one_greppable_log_line(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon()
    await ask_once(daemon, request(sender="evil\t\x1bforged@example.org"))
    logs = daemon.wait_for_log("rule=greylist_defer")
    line = re.search(r"policyd: 4Bf3xY1z2Qz9: client=.*", logs)
    assert line is not None
    assert re.fullmatch(
        r"policyd: 4Bf3xY1z2Qz9: client=mail\.example\.org\[192\.0\.2\.10\], "
        r"from=<evil\?\?forged@example\.org>, to=<bob@example\.com>, "
        r"verdict=DEFER_IF_PERMIT, rule=greylist_defer, stage=RCPT, instance=[^,]+, "
        r"ms=\d+\.\d\d",
        line.group(0),
    )


async def test_a_daemon_killed_right_after_answering_has_logged_every_answer(
    policyd_daemon: StartPolicyd,
) -> None:
    # Lines used to wait up to 0.1 s in a buffer: a SIGKILL then lost decisions that
    # Postfix had already acted on.
    daemon = policyd_daemon()
    reader, writer = await open_client(daemon, tcp=False)
    for i in range(50):
        assert await ask(reader, writer, request(recipient=f"killed{i}@example.com")) == DEFER
    daemon.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=10)
    writer.close()
    logs = daemon.logs()
    assert [f"killed{i}@" in logs for i in range(50)] == [True] * 50


async def test_300_concurrent_connections_are_all_served(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon()

    async def client(n: int) -> list[bytes]:
        reader, writer = await open_client(daemon, tcp=n % 2 == 1)
        try:
            return [
                await ask(reader, writer, request(recipient=f"c{n}r{i}@example.com"))
                for i in range(3)
            ]
        finally:
            writer.close()

    clients = [client(n) for n in range(300)]
    replies = await asyncio.wait_for(asyncio.gather(*clients), 60)
    assert all(r == [DEFER, DEFER, DEFER] for r in replies)


@pytest.mark.parametrize(
    ("name", "data", "kind"),
    [
        ("no equals sign", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "MalformedLine"),
        ("binary junk", b"request=smtpd_access_policy\n\x00\xff\xfe=\x01\n\n", "MalformedLine"),
        (
            "missing request=",
            b"protocol_state=RCPT\nclient_address=192.0.2.1\n\n",
            "UnknownRequest",
        ),
        (
            "too many attributes",
            b"request=smtpd_access_policy\n" + b"".join(b"a%d=1\n" % i for i in range(200)) + b"\n",
            "TooManyAttributes",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
async def test_bad_request_gets_dunno_and_the_connection_goes_on(
    policyd_daemon: StartPolicyd, name: str, data: bytes, kind: str
) -> None:
    daemon = policyd_daemon()
    reader, writer = await open_client(daemon)
    assert await ask(reader, writer, data) == DUNNO
    assert await ask(reader, writer, request()) == DEFER
    writer.close()
    assert f"bad request ({kind})" in daemon.wait_for_log(kind)


@pytest.mark.parametrize(
    ("name", "data", "kind"),
    [
        ("over-long line", b"request=smtpd_access_policy\nsender=" + b"a" * 20000, "LineTooLong"),
        (
            "request over size limit",
            b"request=smtpd_access_policy\n" + b"x=" + b"y" * 8000 + b"\n" * 1 + b"z=" * 40000,
            "LineTooLong",
        ),
        (
            "huge request of short lines",
            b"".join(b"k%d=%s\n" % (i, b"v" * 4000) for i in range(40)),
            "RequestTooLarge",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else "",
)
async def test_unbounded_input_closes_the_connection_and_daemon_keeps_serving(
    policyd_daemon: StartPolicyd, name: str, data: bytes, kind: str
) -> None:
    daemon = policyd_daemon()
    reader, writer = await open_client(daemon)
    writer.write(data)
    assert await closed_by_server(reader)
    writer.close()
    assert await ask_once(daemon, request()) == DEFER
    assert f"bad request ({kind})" in daemon.wait_for_log(kind)
    assert "Traceback" not in daemon.logs()


async def test_stalled_client_does_not_block_others_and_is_dropped(
    policyd_daemon: StartPolicyd,
) -> None:
    daemon = policyd_daemon({"policyd": {"idle_timeout": 1.0}})
    stalled_reader, stalled_writer = await open_client(daemon)
    stalled_writer.write(request()[:40])  # half a request, then silence
    await stalled_writer.drain()
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await open_client(daemon)
    for i in range(20):
        assert await ask(reader, writer, request(recipient=f"s{i}@example.com")) == DEFER
    assert loop.time() - started < 0.9  # answered while the stalled client still holds on
    # The stalled connection is closed after the timeout; the busy one, which keeps asking
    # (a silent one would rightly be closed as idle after the same 1 s), is not.
    waiting = asyncio.create_task(closed_by_server(stalled_reader))
    try:
        asked = 0
        while not waiting.done():
            reply = await ask(reader, writer, request(recipient=f"k{asked}@example.com"))
            assert reply == DEFER
            asked += 1
            await asyncio.sleep(0.2)
        assert waiting.result()
        assert asked >= 3  # the busy connection was served all through the stall timeout
        assert "client stalled mid-request" in daemon.logs()
        assert await ask(reader, writer, request(recipient="after@example.com")) == DEFER
    finally:
        waiting.cancel()
        writer.close()
        stalled_writer.close()


async def test_idle_connection_is_closed_after_idle_timeout(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon({"policyd": {"idle_timeout": 0.5}})
    reader, writer = await open_client(daemon)
    assert await ask(reader, writer, request()) == DEFER
    started = time.monotonic()
    assert await closed_by_server(reader)
    assert 0.4 < time.monotonic() - started < 3.0
    writer.close()


@pytest.mark.expect_log(r"reload failed, keeping the running config")
async def test_sighup_reloads_a_good_config_and_keeps_the_old_on_a_bad_one(
    policyd_daemon: StartPolicyd,
) -> None:
    daemon = policyd_daemon()
    assert await ask_once(daemon, request(recipient="r1@example.com")) == DEFER
    daemon.rewrite_config({"greylisting": {"enabled": False}})
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_for_log("config reloaded")
    assert await ask_once(daemon, request(recipient="r2@example.com")) == DUNNO

    daemon.rewrite_config({"greylisting": {"enabled": True, "delay": -5}})
    daemon.send_signal(signal.SIGHUP)
    logs = daemon.wait_for_log("reload failed")
    assert "greylisting.delay" in logs
    # The running config (greylisting off) is kept, and the daemon still serves.
    assert await ask_once(daemon, request(recipient="r3@example.com")) == DUNNO
    assert daemon.process.poll() is None


async def test_sigterm_finishes_the_request_in_flight(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon({"store": {"timeout": 3.0}})
    db = Path(daemon.store_url.removeprefix("sqlite://"))
    # Hold the database's write lock so the greylist update waits inside the daemon.
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    reader, writer = await open_client(daemon)
    writer.write(request())
    await writer.drain()
    await asyncio.sleep(0.5)
    daemon.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    locker.execute("COMMIT")
    locker.close()
    reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), ANSWER_TIMEOUT)
    # The request was finished, not cut short into the default answer.
    assert reply == DEFER
    assert await closed_by_server(reader)
    writer.close()
    assert await asyncio.to_thread(daemon.process.wait, 10) == 0
    assert "policyd: stopped" in daemon.logs()
    assert daemon.socket_path is not None and not daemon.socket_path.exists()


async def test_list_change_is_visible_within_one_second_without_restart(
    policyd_daemon: StartPolicyd,
) -> None:
    daemon = policyd_daemon({"store": {"refresh_interval": 0.5}})
    assert await ask_once(daemon, request(client_address="198.51.100.7")) == DEFER
    store = open_store(daemon.store_url)
    try:
        await store.add_list_entries([ListEntry(ListName.FORBIDDEN, "198.51.100.7")])
    finally:
        await store.close()
    loop = asyncio.get_running_loop()
    added = loop.time()
    reply = b""
    while loop.time() - added < 2.0:
        reply = await ask_once(
            daemon, request(client_address="198.51.100.7", recipient="x@example.com")
        )
        if reply.startswith(b"action=554"):
            break
        await asyncio.sleep(0.05)
    assert reply.startswith(b"action=554 5.7.1 ")
    assert loop.time() - added < 1.0


def test_bad_config_exits_2_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[policyd]\nmetrics_listen = "0.0.0.0:9641"\n', encoding="utf-8")
    result = subprocess.run(
        [POSTWARDEN, "--config", str(config), "policyd"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "policyd.metrics_listen" in result.stderr and "loopback" in result.stderr
    assert "Traceback" not in result.stderr


async def test_list_added_with_the_cli_is_enforced_without_restart(
    policyd_daemon: StartPolicyd,
) -> None:
    daemon = policyd_daemon()
    sender = request(sender="spammer@bad.example")
    assert await ask_once(daemon, sender) == DEFER
    result = await asyncio.to_thread(
        subprocess.run,
        [
            POSTWARDEN,
            "--config",
            str(daemon.config_path),
            "lists",
            "add",
            "forbidden",
            "bad.example",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    reply = b""
    for _ in range(40):  # bounded: 40 x 50 ms
        reply = await ask_once(daemon, sender)
        if reply != DEFER:
            break
        await asyncio.sleep(0.05)
    assert reply.startswith(b"action=554 5.7.1 ") and b"bad.example" in reply


def _netstring(text: str) -> bytes:
    data = text.encode()
    return b"%d:%s," % (len(data), data)


async def test_aliases_socketmap_is_served_beside_the_policy_socket(
    policyd_daemon: StartPolicyd, tmp_path: Path
) -> None:
    daemon = policyd_daemon({"policyd": {"aliases_listen": f"unix:{tmp_path / 'aliases.sock'}"}})
    store = open_store(daemon.store_url)
    try:
        await store.set_alias("info@example.com", ["a@example.org", "b@example.org"])
    finally:
        await store.close()
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "aliases.sock"))
    writer.write(_netstring("aliases info@example.com") + _netstring("aliases nobody@example.com"))
    expected = _netstring("OK a@example.org,b@example.org") + _netstring("NOTFOUND ")
    replies = await asyncio.wait_for(reader.readexactly(len(expected)), ANSWER_TIMEOUT)
    writer.close()
    assert replies == expected
    assert await ask_once(daemon, request()) == DEFER  # the policy socket is unaffected


async def test_connections_over_max_connections_are_refused_and_logged(
    policyd_daemon: StartPolicyd,
) -> None:
    daemon = policyd_daemon({"policyd": {"max_connections": 2}})
    held = [await open_client(daemon) for _ in range(2)]
    for reader, writer in held:
        assert await ask(reader, writer, request()) == DEFER
    reader, writer = await open_client(daemon)
    assert await closed_by_server(reader)
    writer.close()
    assert "max_connections=2 reached" in daemon.wait_for_log("max_connections=2")
    held[0][1].close()
    await asyncio.sleep(0.2)
    assert await ask_once(daemon, request()) == DEFER  # a slot is free again
    held[1][1].close()
