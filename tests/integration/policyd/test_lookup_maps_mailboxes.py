"""The `mailboxes` map: the LMTP prober against a scripted server, then the whole path
(Postfix's `postmap` -> policyd's socketmap -> a real Dovecot LMTP) with real daemons."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from policyd.mailbox_probe import MAX_IDLE_SECONDS, MailboxProber, MailboxStatus
from policyd.socketmap_codec import encode_netstring
from postwarden.config.types import ListenAddress
from tests.fixtures.mail_system import MailSystem, MailSystemFactory
from tests.fixtures.policyd_daemon import PolicydHandle, StartPolicyd

POSTMAP_TIMEOUT = 15.0
# Dovecot re-reads a changed passwd-file on the first lookup in a new second of its clock
# (db-passwd-file.c: last_sync_time == ioloop_time): a change is seen within this time.
DOVECOT_PASSWD_FILE_RECHECK = 1.1
S220_GREETING = b"220 vm Dovecot (Debian) ready.\r\n"
S250_LHLO = b"250-vm\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n"
S250_MAIL = b"250 2.1.0 OK\r\n"
S250_RCPT = b"250 2.1.5 OK\r\n"
S250_RSET = b"250 2.0.0 OK\r\n"
S550_NO_USER = b"550 5.1.1 <%s> User doesn't exist: %s\r\n"


# --- the prober against a scripted LMTP server (in-process, on a unix socket) -------------


@dataclass
class ScriptedLmtp:
    """Dovecot's LMTP replies for known users; knobs for the failures a probe must survive."""

    users: set[str]
    path: Path
    commands: list[bytes] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    most_open: int = 0
    close_after_rset: bool = False  # Dovecot dropping an idle client
    close_on_reuse: bool = False  # … just as the client sends its next probe
    rcpt_reply: bytes | None = None  # instead of the user lookup (garbage, 4xx, …)
    stall_rcpt: bool = False  # never answer RCPT
    rcpt_delay: float = 0.0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            writer.write(S220_GREETING)
            transactions = 0
            while line := await reader.readline():
                self.commands.append(line)
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
                if verb == b"MAIL" and self.close_on_reuse and transactions:
                    return
                if verb == b"RSET":
                    transactions += 1
                if verb == b"LHLO":
                    writer.write(S250_LHLO)
                elif verb == b"MAIL":
                    writer.write(S250_MAIL)
                elif verb == b"RCPT":
                    if self.stall_rcpt:
                        await asyncio.sleep(30)
                    await asyncio.sleep(self.rcpt_delay)
                    writer.write(self._rcpt(line))
                elif verb == b"RSET":
                    writer.write(S250_RSET)
                    if self.close_after_rset:
                        await writer.drain()
                        return
                else:
                    writer.write(b"500 5.5.1 Unknown command\r\n")
                await writer.drain()
        finally:
            self.open_now -= 1
            writer.close()

    def _rcpt(self, line: bytes) -> bytes:
        if self.rcpt_reply is not None:
            return self.rcpt_reply
        address = line.partition(b"<")[2].rpartition(b">")[0]
        if address.decode() in self.users:
            return S250_RCPT
        return S550_NO_USER % (address, address)

    @property
    def lhlo_count(self) -> int:
        return sum(1 for c in self.commands if c.startswith(b"LHLO"))


@pytest.fixture
async def lmtp(tmp_path: Path) -> AsyncIterator[ScriptedLmtp]:
    script = ScriptedLmtp({"alice@example.test"}, tmp_path / "lmtp")
    server = await asyncio.start_unix_server(script.serve, path=str(script.path))
    try:
        yield script
    finally:
        server.close()
        for task in script.tasks:
            task.cancel()
        await asyncio.gather(*script.tasks, return_exceptions=True)
        await server.wait_closed()


def prober_for(script: ScriptedLmtp, **kwargs: object) -> MailboxProber:
    return MailboxProber(ListenAddress("unix", path=str(script.path)), **kwargs)  # type: ignore[arg-type]


async def test_known_and_unknown_users_over_one_connection(lmtp: ScriptedLmtp) -> None:
    prober = prober_for(lmtp)
    try:
        got = [
            (await prober.probe(a)).status
            for a in ("alice@example.test", "nobody@example.test", "alice@example.test")
        ]
    finally:
        await prober.close()
    assert got == [MailboxStatus.EXISTS, MailboxStatus.NO_SUCH_USER, MailboxStatus.EXISTS]
    # LHLO once, then only MAIL/RCPT/RSET: one round trip per lookup.
    assert lmtp.connections == 1
    assert lmtp.lhlo_count == 1
    assert lmtp.commands[1:4] == [
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<alice@example.test>\r\n",
        b"RSET\r\n",
    ]


async def test_connection_dropped_by_dovecot_between_lookups_is_replaced(
    lmtp: ScriptedLmtp,
) -> None:
    lmtp.close_after_rset = True
    prober = prober_for(lmtp)
    try:
        first = await prober.probe("alice@example.test")
        await asyncio.sleep(0.05)  # the server has closed the pooled connection
        second = await prober.probe("alice@example.test")
        third = await prober.probe("nobody@example.test")
    finally:
        await prober.close()
    assert (first.status, second.status) == (MailboxStatus.EXISTS, MailboxStatus.EXISTS)
    assert third.status is MailboxStatus.NO_SUCH_USER
    assert lmtp.connections == 3


async def test_connection_dropped_while_a_probe_is_sent_is_retried_once(
    lmtp: ScriptedLmtp,
) -> None:
    lmtp.close_on_reuse = True
    prober = prober_for(lmtp)
    try:
        got = [(await prober.probe("alice@example.test")).status for _ in range(3)]
    finally:
        await prober.close()
    # Each reuse found the connection gone before any reply: asked again on a new one.
    assert got == [MailboxStatus.EXISTS] * 3
    assert lmtp.connections == 3


async def test_connection_idle_too_long_is_closed_not_reused(lmtp: ScriptedLmtp) -> None:
    now = [0.0]
    prober = prober_for(lmtp, clock=lambda: now[0])
    try:
        await prober.probe("alice@example.test")
        await prober.probe("alice@example.test")
        now[0] += MAX_IDLE_SECONDS + 1
        await prober.probe("alice@example.test")
        await asyncio.sleep(0.05)
        # The old connection was closed (Dovecot's lmtp process freed), the new one is open.
        assert (lmtp.connections, lmtp.open_now) == (2, 1)
    finally:
        await prober.close()


async def test_silent_dovecot_is_temporary_within_the_timeout(lmtp: ScriptedLmtp) -> None:
    lmtp.stall_rcpt = True
    prober = prober_for(lmtp, timeout=0.2)
    try:
        result = await asyncio.wait_for(prober.probe("alice@example.test"), 2.0)
        # The stalled connection is out of step: never reused.
        lmtp.stall_rcpt = False
        after = await prober.probe("alice@example.test")
    finally:
        await prober.close()
    assert (result.status, result.kind) == (MailboxStatus.TEMPORARY, "timeout")
    assert after.status is MailboxStatus.EXISTS
    assert lmtp.connections == 2


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (b"250 2.1.5 OK\r\nthis is not smtp\r\n", "malformed reply"),
        (b"hello\r\n", "malformed reply"),
        (b"451 4.3.0 <alice@example.test> Temporary internal error\r\n", "4xx to RCPT"),
        (b"501 5.5.4 Invalid TO\r\n", "unexpected 5xx to RCPT"),
    ],
)
async def test_garbage_or_temporary_reply_is_temporary(
    lmtp: ScriptedLmtp, reply: bytes, kind: str
) -> None:
    lmtp.rcpt_reply = reply
    prober = prober_for(lmtp)
    try:
        result = await prober.probe("alice@example.test")
        lmtp.rcpt_reply = None
        after = await prober.probe("nobody@example.test")
    finally:
        await prober.close()
    assert (result.status, result.kind) == (MailboxStatus.TEMPORARY, kind)
    # Whatever came before, the next lookup gets its own answer, not a stale reply.
    assert after.status is MailboxStatus.NO_SUCH_USER


async def test_no_listener_is_temporary(tmp_path: Path) -> None:
    prober = MailboxProber(ListenAddress("unix", path=str(tmp_path / "missing")))
    result = await prober.probe("alice@example.test")
    await prober.close()
    assert (result.status, result.kind) == (MailboxStatus.TEMPORARY, "cannot connect")


async def test_parallel_lookups_use_at_most_max_connections(lmtp: ScriptedLmtp) -> None:
    lmtp.rcpt_delay = 0.02
    prober = prober_for(lmtp, max_connections=2)
    try:
        results = await asyncio.gather(*(prober.probe("alice@example.test") for _ in range(10)))
    finally:
        await prober.close()
    assert {r.status for r in results} == {MailboxStatus.EXISTS}
    assert lmtp.most_open == 2
    assert lmtp.connections == 2


async def test_without_keeping_connections_each_lookup_connects(lmtp: ScriptedLmtp) -> None:
    prober = prober_for(lmtp, keep_connections=False)
    try:
        for _ in range(3):
            assert (await prober.probe("alice@example.test")).status is MailboxStatus.EXISTS
    finally:
        await prober.close()
    assert lmtp.connections == 3


# --- the whole path: postmap -> policyd -> real Dovecot LMTP -------------------------------


@dataclass
class MailboxMapUnderTest:
    system: MailSystem
    daemon: PolicydHandle
    socket_path: Path
    config_dir: Path

    @property
    def table(self) -> str:
        return f"socketmap:unix:{self.socket_path}:mailboxes"

    def postmap(self, key: str) -> tuple[int, str]:
        """`postmap -q key socketmap:unix:…:mailboxes`, Postfix's own socketmap client."""
        done = subprocess.run(
            ["postmap", "-c", str(self.config_dir), "-q", key, self.table],
            capture_output=True,
            text=True,
            timeout=POSTMAP_TIMEOUT,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr

    def socketmap(self, *keys: str) -> list[bytes]:
        """Raw socketmap requests on one connection (keys postmap cannot send)."""
        replies = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            for key in keys:
                sock.sendall(encode_netstring(b"mailboxes " + key.encode()))
                replies.append(sock.recv(1000))
        return replies

    def set_users(self, users: dict[str, str]) -> None:
        self.system.layout.users_file.write_text(
            "".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in users.items())
        )


@pytest.fixture
def mailbox_map(
    mail_system_factory: MailSystemFactory,
    policyd_daemon: StartPolicyd,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MailboxMapUnderTest]:
    system = mail_system_factory()
    directory = tmp_path_factory.mktemp("mbxmap")
    # postmap needs a main.cf; an empty one means Postfix's built-in defaults.
    (directory / "main.cf").write_text("")
    sock = directory / "aliases.sock"
    daemon = policyd_daemon(
        {
            "policyd": {
                "aliases_listen": f"unix:{sock}",
                "mailbox_lmtp": f"unix:{system.layout.lmtp_socket}",
            }
        }
    )
    yield MailboxMapUnderTest(system, daemon, sock, directory)


def test_existing_mailbox_is_found(mailbox_map: MailboxMapUnderTest) -> None:
    assert mailbox_map.postmap("alice@example.test") == (0, "alice@example.test\n")


def test_unknown_mailbox_is_not_found(mailbox_map: MailboxMapUnderTest) -> None:
    assert mailbox_map.postmap("nobody@example.test") == (1, "")
    assert mailbox_map.postmap("alice@other.test") == (1, "")


def test_catch_all_and_bare_local_part_are_not_found(mailbox_map: MailboxMapUnderTest) -> None:
    assert mailbox_map.postmap("@example.test") == (1, "")
    assert mailbox_map.postmap("alice") == (1, "")


def test_deleted_mailbox_is_refused_on_the_very_next_lookup(
    mailbox_map: MailboxMapUnderTest,
) -> None:
    assert mailbox_map.postmap("bob@example.test") == (0, "bob@example.test\n")
    mailbox_map.set_users({"alice@example.test": "alice-secret"})
    # Dovecot's passwd-file looks at the file at most once per second of its clock.
    time.sleep(DOVECOT_PASSWD_FILE_RECHECK)
    assert mailbox_map.postmap("bob@example.test") == (1, "")
    # And a new mailbox is known at once too.
    mailbox_map.set_users({"alice@example.test": "a", "carol@example.test": "c"})
    time.sleep(DOVECOT_PASSWD_FILE_RECHECK)
    assert mailbox_map.postmap("carol@example.test") == (0, "carol@example.test\n")


def test_dovecot_stopped_is_a_temporary_error(mailbox_map: MailboxMapUnderTest) -> None:
    assert mailbox_map.postmap("alice@example.test")[0] == 0
    mailbox_map.system.stop()
    for _ in range(3):
        rc, out = mailbox_map.postmap("alice@example.test")
        # A temporary error, not "not found": Postfix answers 451 and the mail waits.
        assert rc != 0
        assert "socketmap server temporary error: mailbox lookup in Dovecot failed" in out
    # One log line for the outage, not one per lookup.
    assert mailbox_map.daemon.logs().count("answering TEMP") == 1


def test_injected_lmtp_commands_are_never_sent(mailbox_map: MailboxMapUnderTest) -> None:
    # Were the key written as is, Dovecot's replies to the smuggled RCPT would answer the
    # next lookup (nobody@… "exists"): the stream out of step.
    smuggled = "x@example.test>\r\nRSET\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test"
    replies = mailbox_map.socketmap(
        smuggled, "nobody@example.test", "a b@example.test", "alice@example.test"
    )
    assert replies == [
        b"9:NOTFOUND ,",
        b"9:NOTFOUND ,",
        b"9:NOTFOUND ,",
        b"21:OK alice@example.test,",
    ]


def test_map_without_mailbox_lmtp_is_perm_and_logged_once(
    policyd_daemon: StartPolicyd, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("nombx")
    (directory / "main.cf").write_text("")
    sock = directory / "aliases.sock"
    daemon = policyd_daemon({"policyd": {"aliases_listen": f"unix:{sock}"}})
    table = f"socketmap:unix:{sock}:mailboxes"
    for _ in range(2):
        done = subprocess.run(
            ["postmap", "-c", str(directory), "-q", "alice@example.test", table],
            capture_output=True,
            text=True,
            timeout=POSTMAP_TIMEOUT,
            check=False,
        )
        assert done.returncode != 0
        assert "socketmap server permanent error" in done.stderr
    assert daemon.logs().count("policyd.mailbox_lmtp is not set") == 1
