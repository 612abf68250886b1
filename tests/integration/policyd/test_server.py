"""The real `postwarden policyd` process on a unix socket and TCP, driven as Postfix drives it."""

from __future__ import annotations

import asyncio
import grp
import os
import re
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from postwarden.policy.records import ListEntry, ListName
from postwarden.store import open_store
from tests.fixtures.dns_server import DNSBL_ZONE, SPF_ZONE, DnsServer
from tests.fixtures.policyd_daemon import (
    POSTWARDEN,
    PolicydHandle,
    StartPolicyd,
    free_tcp_port,
    start_policyd,
)

DEFER = b"action=DEFER_IF_PERMIT 4.7.1 Greylisted, please try again later\n\n"
DUNNO = b"action=DUNNO\n\n"
ANSWER_TIMEOUT = 5.0


def request(**attrs: str) -> bytes:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "mail.example.org",
        "helo_name": "mail.example.org",
        "sender": "alice@example.org",
        "recipient": "bob@example.com",
        "queue_id": "4Bf3xY1z2Qz9",
        "instance": "1a2b.3c4d.5e6f.0",
    }
    base.update(attrs)
    return b"".join(f"{k}={v}\n".encode() for k, v in base.items()) + b"\n"


async def open_client(
    daemon: PolicydHandle, tcp: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tcp:
        assert daemon.tcp_port is not None
        return await asyncio.open_connection("127.0.0.1", daemon.tcp_port)
    return await asyncio.open_unix_connection(str(daemon.socket_path))


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readuntil(b"\n\n"), ANSWER_TIMEOUT)


async def ask_once(daemon: PolicydHandle, data: bytes) -> bytes:
    reader, writer = await open_client(daemon)
    try:
        return await ask(reader, writer, data)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(100), ANSWER_TIMEOUT) == b""
    except ConnectionResetError:
        return True


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
        r"verdict=DEFER_IF_PERMIT, rule=greylist_defer, ms=\d+\.\d\d",
        line.group(0),
    )


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


async def test_greylist_state_lives_in_the_sqlite_store(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon()
    assert daemon.store_url.startswith("sqlite://")
    assert await ask_once(daemon, request(recipient="kept@example.com")) == DEFER
    store = open_store(daemon.store_url)
    # The daemon commits greylist writes in batches every few ms (write-behind).
    deadline = time.monotonic() + 2.0
    try:
        while True:
            triplets = await store.greylist_triplets()
            if any("kept@example.com" in key for key, _ in triplets):
                break
            assert time.monotonic() < deadline, triplets
            await asyncio.sleep(0.01)
    finally:
        await store.close()


def _scrape(port: int) -> str:
    # The metrics server comes up beside the workers: give it a moment (bounded).
    deadline = time.monotonic() + 10
    while True:
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("workers", [1, 2])
async def test_metrics_count_decisions_across_workers(
    policyd_daemon: StartPolicyd, workers: int
) -> None:
    port = free_tcp_port()
    daemon = policyd_daemon(
        {"policyd": {"metrics_listen": f"127.0.0.1:{port}", "workers": workers}}
    )
    for i in range(12):
        assert await ask_once(daemon, request(recipient=f"m{i}@example.com")) == DEFER
    await ask_once(daemon, b"junk\n\n")
    text = await asyncio.to_thread(_scrape, port)
    decisions = "postwarden_policy_decisions_total"
    assert _sample(text, decisions, verdict="DEFER_IF_PERMIT", rule="greylist_defer") == 12
    assert _sample(text, decisions, verdict="DUNNO", rule="bad_request") == 1
    assert _sample(text, "postwarden_policy_request_seconds_count") >= 12
    assert _sample(text, "postwarden_policy_errors_total", kind="protocol_MalformedLine") == 1


async def test_workers_share_the_sockets_and_stop_together(policyd_daemon: StartPolicyd) -> None:
    daemon = policyd_daemon({"policyd": {"workers": 2}})

    async def client(n: int) -> bytes:
        return await ask_once(daemon, request(recipient=f"w{n}@example.com"))

    replies = await asyncio.gather(*(client(n) for n in range(40)))
    assert set(replies) == {DEFER}
    daemon.wait_for_log("policyd: 4Bf3")  # decision lines are written in batches
    pids = set(re.findall(r"postwarden\.policyd\[(\d+)\]: policyd: 4Bf3", daemon.logs()))
    assert len(pids) >= 1
    assert await asyncio.to_thread(daemon.stop) == 0, daemon.logs()


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


def test_second_daemon_on_a_live_socket_refuses_to_start(
    policyd_daemon: StartPolicyd, tmp_path: Path
) -> None:
    first = policyd_daemon(tcp=False)
    config = tmp_path / "second.toml"
    config.write_text(
        f'[store]\nurl = "sqlite://{tmp_path / "s.db"}"\n'
        f'[policyd]\nlisten = ["unix:{first.socket_path}"]\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [POSTWARDEN, "--config", str(config), "policyd"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "another server is already listening" in result.stderr
    assert "Traceback" not in result.stderr
    assert first.process.poll() is None


def test_stale_socket_file_is_replaced_with_configured_mode_and_group(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    directory = tmp_path_factory.mktemp("stale")
    stale = directory / "policyd.sock"
    import socket

    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()  # the file stays, nobody listens: what a killed daemon leaves
    group = grp.getgrgid(os.getgid()).gr_name
    handle = start_policyd(
        directory, {"policyd": {"socket_mode": "0640", "socket_group": group}}, tcp=False
    )
    try:
        assert handle.socket_path == stale
        assert oct(stale.stat().st_mode & 0o777) == "0o640"
        assert stale.stat().st_gid == os.getgid()
    finally:
        assert handle.stop() == 0


async def test_dnsbl_listing_and_spf_results_come_from_real_dns(
    policyd_daemon: StartPolicyd, dns_server: DnsServer
) -> None:
    daemon = policyd_daemon(
        {
            "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0},
            "dnsbl": {"enabled": True, "zones": [{"zone": DNSBL_ZONE}]},
            "spf": {"enabled": True, "fail_action": "reject"},
            "greylisting": {"enabled": False},
        }
    )
    listed = await ask_once(daemon, request(client_address="192.0.2.1"))
    assert listed.startswith(b"action=554 5.7.1 ") and DNSBL_ZONE.encode() in listed
    passed = await ask_once(
        daemon, request(client_address="192.0.2.10", sender=f"a@pass.{SPF_ZONE}")
    )
    assert passed.startswith(b"action=PREPEND Received-SPF: pass ")
    failed = await ask_once(
        daemon, request(client_address="192.0.2.99", sender=f"a@pass.{SPF_ZONE}")
    )
    assert failed.startswith(b"action=550 5.7.23 ")


async def test_unreachable_store_answers_the_default_and_logs_once(
    policyd_daemon: StartPolicyd,
) -> None:
    dead = free_tcp_port()  # nothing listens there
    daemon = policyd_daemon({"store": {"url": f"redis://127.0.0.1:{dead}/0", "timeout": 0.3}})
    for i in range(5):
        assert await ask_once(daemon, request(recipient=f"d{i}@example.com")) == DUNNO
    logs = daemon.wait_for_log("rule=default")
    assert logs.count("store failure, answering the default action") == 1
    assert logs.count("rule=default") == 5
    assert "Traceback" not in logs


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


async def test_supervisor_restarts_a_dead_worker_and_forwards_sighup(
    policyd_daemon: StartPolicyd,
) -> None:
    daemon = policyd_daemon({"policyd": {"workers": 2}})
    deadline = time.monotonic() + 10
    while len(workers := re.findall(r"policyd\[(\d+)\]: policyd: listening", daemon.logs())) < 2:
        assert time.monotonic() < deadline, daemon.logs()
        await asyncio.sleep(0.05)
    os.kill(int(workers[0]), signal.SIGKILL)
    daemon.wait_for_log("restarting it")
    deadline = time.monotonic() + 10
    while len(re.findall(r"policyd: listening on", daemon.logs())) < 3:
        assert time.monotonic() < deadline, daemon.logs()
        await asyncio.sleep(0.05)
    replies = await asyncio.gather(
        *(ask_once(daemon, request(recipient=f"k{n}@x.org")) for n in range(20))
    )
    assert set(replies) == {DEFER}

    daemon.rewrite_config({"greylisting": {"enabled": False}})
    daemon.send_signal(signal.SIGHUP)
    while daemon.logs().count("config reloaded") < 2:
        assert time.monotonic() < deadline + 5, daemon.logs()
        await asyncio.sleep(0.05)
    replies = await asyncio.gather(
        *(ask_once(daemon, request(recipient=f"h{n}@x.org")) for n in range(20))
    )
    assert set(replies) == {DUNNO}
