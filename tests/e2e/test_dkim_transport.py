"""What milterd signs is what receivers get: long lines through a real Postfix, checked by
two verifiers on the delivered copies; and a login cannot be signed for another's domain.

The gateway (a private Postfix + Dovecot, milterd behind smtpd_milters) takes one message
from alice over authenticated submission, for bob (local mailbox, Postfix's LMTP client)
and for dave at a second private Postfix (the default relay, Postfix's SMTP client). Both
clients break lines over 998 octets (smtp/lmtp_line_length_limit) unless milterd already
did so before signing. Each copy is read back raw over IMAP and verified by dkimpy and by
OpenDKIM's `opendkim-testmsg`, both finding the key on the test NSD.
"""

from __future__ import annotations

import contextlib
import imaplib
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.dns_server import DnsServer
from tests.fixtures.gateway import dkim_results, publish_dkim_keys
from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory
from tests.fixtures.milterd_daemon import MilterdHandle, start_milterd

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"
BOB, BOB_PW = "bob@example.test", "bob-secret"
DAVE, DAVE_PW = "dave@outside.test", "outside-secret"
SUBJECT = b"report-" + b"x" * 1193  # 1,200 octets and no blank: cut, as Postfix would cut it
BODY_LINE = b"L" * 1000
OPENDKIM_TIMEOUT = 30


@dataclass
class Transport:
    gateway: MailSystem
    relay: MailSystem
    milterd: MilterdHandle
    dns: DnsServer


@pytest.fixture
def transport(mail_system_factory: MailSystemFactory, dns_server: DnsServer) -> Iterator[Transport]:
    # World-traversable: Postfix's smtpd runs as `postfix` and must reach milterd's socket.
    directory = Path(tempfile.mkdtemp(prefix="pw-transport-"))
    directory.chmod(0o755)
    dkim, _ = publish_dkim_keys(dns_server, directory, "unused-sender.test")
    milterd = start_milterd(
        directory,
        {
            "milterd": {"socket_mode": "0660", "socket_group": "postfix", "log_level": "info"},
            "dkim": dkim,
            "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0},
            "mail": {"hostname": "mx.example.test", "main_domain": "example.test"},
        },
    )
    try:
        relay = mail_system_factory(
            {"mail": {"hostname": "mx.outside.test", "main_domain": "outside.test"}},
            users={DAVE: DAVE_PW},
        )
        smarthost = {"name": "isp", "host": HOST, "port": relay.ports["smtp_port"]}
        gateway = mail_system_factory(
            {"mail": {"relays": [smarthost]}}, milterd_socket=str(milterd.socket_path)
        )
        yield Transport(gateway, relay, milterd, dns_server)
    finally:
        milterd.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _raw_messages(mail: MailSystem, user: str, password: str) -> list[bytes]:
    """The stored messages byte for byte (email.message would refold long headers)."""
    conn = imaplib.IMAP4(HOST, mail.ports["imap_port"], timeout=10)
    try:
        conn.starttls(ssl_context=mail.client_tls_context())
        conn.login(user, password)
        conn.select("INBOX", readonly=True)
        _, data = conn.search(None, "ALL")
        raw = []
        for num in data[0].split():
            _, parts = conn.fetch(num, "(BODY.PEEK[])")
            raw.append(next(p[1] for p in parts if isinstance(p, tuple)))
        return raw
    finally:
        conn.logout()


def _wait_raw(mail: MailSystem, user: str, password: str) -> bytes:
    mail.wait_for_delivery(user, password)  # polls, and fails with the logs
    (raw,) = _raw_messages(mail, user, password)
    return raw


# --- OpenDKIM's verifier on the test DNS -----------------------------------------------------


class DnsForwarder:
    """Port 53 on a loopback address, relayed to the test NSD (UDP and TCP).

    opendkim-testmsg looks keys up through glibc's resolver, which reads /etc/resolv.conf and
    only ever asks port 53; NSD runs on a free high port. The forwarder and a private mount
    namespace (a resolv.conf naming it, bind-mounted over /etc/resolv.conf for that one
    process) point OpenDKIM at the test DNS without touching the machine's own.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.udp, self.tcp, self.address = self._bind()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _bind() -> tuple[socket.socket, socket.socket, str]:
        for last in range(100, 140):
            address = f"127.0.0.{last}"
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                udp.bind((address, 53))
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((address, 53))
                tcp.listen()
            except OSError:
                udp.close()
                tcp.close()
                continue
            udp.settimeout(0.2)
            tcp.settimeout(0.2)
            return udp, tcp, address
        pytest.fail("no loopback address with port 53 free for the DNS forwarder")

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                query, client = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                up.settimeout(2.0)
                with contextlib.suppress(OSError):
                    up.sendto(query, self.upstream)
                    self.udp.sendto(up.recv(65535), client)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2.0)
                query = _read_framed(conn)
                with socket.create_connection(self.upstream, timeout=2.0) as up:
                    up.sendall(struct.pack("!H", len(query)) + query)
                    answer = _read_framed(up)
                conn.sendall(struct.pack("!H", len(answer)) + answer)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self.udp.close()
        self.tcp.close()


def _read_framed(conn: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    (length,) = struct.unpack("!H", exactly(2))
    return exactly(length)


@pytest.fixture
def opendkim_verify(dns_server: DnsServer, tmp_path: Path) -> Iterator[OpenDkim]:
    if shutil.which("opendkim-testmsg") is None or shutil.which("unshare") is None:
        pytest.fail("opendkim-testmsg (opendkim-tools) and unshare (util-linux) are needed")
    forwarder = DnsForwarder((dns_server.address, dns_server.port))
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {forwarder.address}\noptions timeout:2 attempts:2\n")
    try:
        yield OpenDkim(resolv)
    finally:
        forwarder.close()


@dataclass
class OpenDkim:
    resolv_conf: Path

    def verify(self, raw: bytes) -> subprocess.CompletedProcess[bytes]:
        """`opendkim-testmsg` on the message: exit 0 and no output when it verifies."""
        script = 'mount --bind "$0" /etc/resolv.conf && exec opendkim-testmsg'
        return subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                self.resolv_conf,
            ],
            input=raw.replace(b"\r\n", b"\n"),  # as a local mailbox file holds it
            capture_output=True,
            timeout=OPENDKIM_TIMEOUT,
            check=False,
        )


# --- the tests -------------------------------------------------------------------------------


def _long_message() -> bytes:
    return (
        b"From: Alice <alice@example.test>\r\n"
        b"To: <bob@example.test>, <dave@outside.test>\r\n"
        b"Subject: " + SUBJECT + b"\r\n"
        b"Message-ID: <long-lines@example.test>\r\n"
        b"\r\n"
        b"A line over the SMTP limit follows.\r\n" + BODY_LINE + b"\r\n" + b"The end.\r\n"
    )


def test_long_lines_signed_by_milterd_verify_where_they_are_delivered(
    transport: Transport, opendkim_verify: OpenDkim
) -> None:
    sent = transport.gateway.smtp_send(
        ALICE,
        [BOB, DAVE],
        message=_long_message(),
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert sent.accepted, sent
    local = _wait_raw(transport.gateway, BOB, BOB_PW)  # through Postfix's LMTP client
    relayed = _wait_raw(transport.relay, DAVE, DAVE_PW)  # through its SMTP client, relayed
    for copy in (local, relayed):
        assert max(len(line) for line in copy.split(b"\r\n")) <= 998
        assert b"\r\n" + BODY_LINE[:998] + b"\r\n " + BODY_LINE[998:] + b"\r\n" in copy
        assert b"Subject: " + SUBJECT[:989] + b"\r\n " + SUBJECT[989:] + b"\r\n" in copy
        assert b"d=example.test" in copy and b"s=s1" in copy
        assert dkim_results(copy, transport.dns.nameserver) == ["pass"]
        checked = opendkim_verify.verify(copy)
        assert checked.returncode == 0 and checked.stdout == b"", checked
        assert checked.stderr == b"", checked
    # milterd broke the lines itself, so Postfix had nothing left to break on either path.
    assert "breaking line > 998 bytes" not in transport.gateway.postfix_log
    transport.milterd.wait_for_log("dkim=signed, rule=sign, long_lines=broken")
    # The same verifier fails a copy changed after signing: its pass above means something.
    tampered = opendkim_verify.verify(local.replace(b"The end.", b"The End."))
    assert tampered.returncode != 0 and b"Bad signature" in tampered.stderr, tampered


@pytest.mark.parametrize(
    "forged_from", ["CEO <ceo@bigbank.example>", "Bob <bob@example.test>"], ids=["other", "same"]
)
def test_a_login_cannot_sign_as_another_address(transport: Transport, forged_from: str) -> None:
    # Another domain, or a neighbour in alice's own domain: neither is hers to sign as.
    forged = (
        f"From: {forged_from}\r\nTo: <bob@example.test>\r\n"
        "Subject: wire the money\r\nMessage-ID: <ceo@bigbank.example>\r\n\r\nNow.\r\n"
    ).encode()
    domain = forged_from.rsplit("@", 1)[1].rstrip(">")
    # The envelope sender is alice's own: Postfix's login binding lets it through to DATA.
    refused = transport.gateway.smtp_send(
        ALICE,
        BOB,
        message=forged,
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert not refused.accepted
    assert (refused.stage, refused.code) == ("data", 550), refused
    assert refused.text.startswith(f"5.7.1 From: address in domain {domain} is not one")
    transport.milterd.wait_for_log(
        f"login=alice@example.test, domain={domain}, selector=-, dkim=rejected, rule=from_mismatch"
    )
    assert transport.gateway.imap_fetch(BOB, BOB_PW) == []


def test_a_user_message_without_date_gets_one_before_signing(transport: Transport) -> None:
    # A script's bare message from a logged-in user: milterd oversigns Date and Message-ID,
    # so Postfix must add them before signing (local_header_rewrite_clients), or the next
    # server that adds them breaks the signature. (Behind XCLIENT Postfix still judges the
    # real client, 127.0.0.1, one of its interfaces; the unit test pins the setting.)
    bare = b"From: <alice@example.test>\r\nTo: <dave@outside.test>\r\nSubject: bare\r\n\r\nhi\r\n"
    sent = transport.gateway.smtp_send(
        ALICE,
        DAVE,
        message=bare,
        client_ip="198.51.100.7",
        port_key="submission_port",
        starttls=True,
        login=(ALICE, ALICE_PW),
    )
    assert sent.accepted, sent
    relayed = _wait_raw(transport.relay, DAVE, DAVE_PW)
    headers = relayed.split(b"\r\n\r\n", 1)[0].lower()
    assert b"\r\ndate: " in headers and b"\r\nmessage-id: " in headers
    assert dkim_results(relayed, transport.dns.nameserver) == ["pass"]
