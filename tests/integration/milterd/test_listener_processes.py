"""milterd as a real subprocess, driven over its unix socket by a milter-protocol client.

Keys are published on the real test DNS server (NSD on loopback) as split quoted strings,
exactly as `postwarden dkim dns` prints them; signatures are checked against that DNS.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from postwarden.config.model import DnsConfig
from postwarden.dkim.keys import generate_key, quoted_txt, txt_record, write_key
from postwarden.dkim.signing import canonical_body
from postwarden.dkim.verification import make_dnsfunc, verify_message
from tests.fixtures import milter_client as mc
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.milter_client import MilterResult, split_message
from tests.fixtures.milterd_daemon import MilterdHandle, StartMilterd, start_milterd
from tests.fixtures.policyd_daemon import POSTWARDEN, free_tcp_port

ZONE = "milterd.test"
AUTHSERV = "mx.postwarden.test"
ALICE = "alice@milterd.test"  # the login that may use milterd.test
MESSAGE = (
    b"From: Alice <alice@milterd.test>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Date: Tue, 01 Jan 2030 00:00:00 +0000\r\n"
    b"Message-ID: <q1@milterd.test>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n" + b"The numbers are in.  See you Monday.\r\n" * 200
)


@dataclass
class Keys:
    rsa: Path
    ed25519: Path
    nameserver: str


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer) -> Iterator[Keys]:
    directory = tmp_path_factory.mktemp("dkimkeys")
    rsa_key, ed_key = generate_key("rsa-sha256"), generate_key("ed25519-sha256")
    write_key(rsa_key, directory / "rsa.key")
    write_key(ed_key, directory / "ed.key")
    dns_server.set_zone(
        ZONE,
        [
            f"s1._domainkey TXT ( {quoted_txt(txt_record(rsa_key))} )",
            f"e1._domainkey TXT ( {quoted_txt(txt_record(ed_key))} )",
            "@ A 192.0.2.1",
        ],
    )
    yield Keys(directory / "rsa.key", directory / "ed.key", dns_server.nameserver)


def _config(keys: Keys, *, dual: bool = False, **milterd: Any) -> dict[str, dict[str, Any]]:
    entries = [{"domain": ZONE, "selector": "s1", "algorithm": "rsa-sha256", "key": keys.rsa}]
    if dual:
        entries.append(
            {"domain": ZONE, "selector": "e1", "algorithm": "ed25519-sha256", "key": keys.ed25519}
        )
    return {
        "dkim": {"keys": entries},
        "dns": {"nameservers": [keys.nameserver], "timeout": 2.0},
        "milterd": {"authserv_id": AUTHSERV, **milterd},
    }


def _verify(keys: Keys, message: bytes) -> list[str]:
    dnsfunc = make_dnsfunc(DnsConfig(nameservers=[keys.nameserver], timeout=2.0))
    return [r.result for r in verify_message(message, dnsfunc)]


def _results(result: MilterResult) -> bytes:
    values = result.headers_named("Authentication-Results")
    assert len(values) == 1, result
    return values[0]


@pytest.fixture(scope="module")
def milterd(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[MilterdHandle]:
    """One daemon (RSA + Ed25519 for milterd.test) shared by the tests that only send mail."""
    handle = start_milterd(tmp_path_factory.mktemp("milterd"), _config(keys, dual=True))
    yield handle
    handle.stop()


def test_authenticated_mail_is_signed_and_verifies_against_dns(
    milterd: MilterdHandle, keys: Keys
) -> None:
    result = milterd.session(MESSAGE, client_ip="198.51.100.7", auth_authen=ALICE)
    assert result.action == "accept"
    signatures = result.headers_named("DKIM-Signature")
    assert len(signatures) == 2  # RSA and Ed25519 side by side
    assert b"a=rsa-sha256" in signatures[0]
    assert b"a=ed25519-sha256" in signatures[1]
    assert all(b"l=" not in s.replace(b" ", b"").split(b";")[0] for s in signatures)
    delivered = result.apply(MESSAGE)
    assert _verify(keys, delivered) == ["pass", "pass"]
    # The same message arriving elsewhere: milterd's own verifier passes it too.
    inbound = milterd.session(delivered, client_ip="203.0.113.9")
    assert inbound.action == "accept"
    ar = _results(inbound)
    assert ar.startswith(AUTHSERV.encode() + b"; dkim=pass header.d=milterd.test")
    assert ar.count(b"dkim=pass") == 2
    assert inbound.headers_named("DKIM-Signature") == []


def test_trusted_network_mail_is_signed_untrusted_is_verified(
    milterd: MilterdHandle, keys: Keys
) -> None:
    trusted = milterd.session(MESSAGE, client_ip="127.0.0.1")
    assert len(trusted.headers_named("DKIM-Signature")) == 2
    untrusted = milterd.session(MESSAGE, client_ip="198.51.100.7")
    assert untrusted.headers_named("DKIM-Signature") == []
    assert _results(untrusted) == AUTHSERV.encode() + b"; dkim=none"


def test_other_domains_pass_unsigned(milterd: MilterdHandle) -> None:
    message = MESSAGE.replace(b"alice@milterd.test", b"alice@elsewhere.test")
    result = milterd.session(message, client_ip="127.0.0.1")  # trusted network, no login
    assert result.action == "accept"
    assert result.inserted == [] and result.changed == []
    sub = MESSAGE.replace(b"alice@milterd.test", b"alice@sub.milterd.test")
    assert milterd.session(sub, client_ip="127.0.0.1").inserted == []  # sign_subdomains is off
    milterd.wait_for_log(
        "milterd: 4ABCDEF: client=client.example[127.0.0.1], from=<sender@example.com>, "
        "domain=elsewhere.test, selector=-, dkim=unsigned, rule=no_key, ms="
    )


def test_subdomains_signed_when_enabled(milterd_daemon: StartMilterd, keys: Keys) -> None:
    config = _config(keys)
    config["dkim"]["sign_subdomains"] = True
    daemon = milterd_daemon(config)
    sub = MESSAGE.replace(b"alice@milterd.test", b"alice@sub.milterd.test")
    result = daemon.session(sub, client_ip="127.0.0.1")
    (signature,) = result.headers_named("DKIM-Signature")
    assert b"d=milterd.test" in signature
    assert _verify(keys, result.apply(sub)) == ["pass"]


def test_tampered_message_fails(milterd: MilterdHandle, keys: Keys) -> None:
    signed = milterd.session(MESSAGE, auth_authen=ALICE).apply(MESSAGE)
    tampered = signed.replace(b"See you Monday.", b"See you Friday.", 1)
    ar = _results(milterd.session(tampered, client_ip="203.0.113.9"))
    assert ar.count(b"dkim=fail") == 2
    assert b"body hash mismatch" in ar
    resubjected = signed.replace(b"quarterly numbers", b"quarterly bonus")
    assert _results(milterd.session(resubjected, client_ip="203.0.113.9")).count(b"dkim=fail") == 2


def test_forged_authentication_results_with_our_id_are_removed(milterd: MilterdHandle) -> None:
    forged = (
        b"Authentication-Results: mx.postwarden.test; dkim=pass header.d=bank.test\r\n"
        b"Authentication-Results: other.example; spf=pass\r\n"
        b"Authentication-Results: (comment) MX.Postwarden.Test; dkim=pass\r\n" + MESSAGE
    )
    result = milterd.session(forged, client_ip="203.0.113.9")
    assert sorted(result.changed) == [
        (1, "Authentication-Results", b""),
        (3, "Authentication-Results", b""),
    ]
    delivered = result.apply(forged)
    assert delivered.count(b"Authentication-Results:") == 2
    assert b"other.example; spf=pass" in delivered
    assert delivered.startswith(b"Authentication-Results: mx.postwarden.test; dkim=none")


def test_many_concurrent_connections(milterd: MilterdHandle, keys: Keys) -> None:
    def one_connection(n: int) -> list[bytes]:
        delivered = []
        with milterd.client() as client:
            client.negotiate()
            client.connect("198.51.100.7")
            for i in range(4):  # several messages per connection, as Postfix reuses them
                message = MESSAGE.replace(b"<q1@", f"<c{n}-{i}@".encode())
                result = client.message(message, auth_authen=ALICE)
                delivered.append(result.apply(message))
        return delivered

    with ThreadPoolExecutor(16) as pool:
        outcomes = [m for batch in pool.map(one_connection, range(16), timeout=60) for m in batch]
    assert len(outcomes) == 64
    assert len({m.split(b"b=", 1)[1][:40] for m in outcomes}) == 64  # each signed on its own
    for delivered in outcomes[::8]:
        assert _verify(keys, delivered) == ["pass", "pass"]


# --- faults: one log line, the configured answer, and the daemon keeps serving ------------


@pytest.mark.parametrize("on_error", ["accept", "tempfail"])
def test_outgoing_message_without_from(
    milterd_daemon: StartMilterd, keys: Keys, on_error: str
) -> None:
    daemon = milterd_daemon(_config(keys, on_error=on_error))
    no_from = b"To: bob@example.net\r\nSubject: x\r\n\r\nhi\r\n"
    result = daemon.session(no_from, client_ip="127.0.0.1")  # trusted, no login to bind to
    assert result.action == on_error
    assert result.inserted == []
    if on_error == "tempfail":
        assert result.reply.startswith(b"451 4.7.1")
    daemon.wait_for_log("without a single parsable From address; on_error=" + on_error)
    assert len(daemon.session(MESSAGE, auth_authen=ALICE).headers_named("DKIM-Signature")) == 1


@pytest.mark.expect_log(r"DKIM key .*nonexistent\.key: file not found")
@pytest.mark.parametrize("on_error", ["accept", "tempfail"])
def test_missing_key_file(
    milterd_daemon: StartMilterd, keys: Keys, tmp_path: Path, on_error: str
) -> None:
    config = _config(keys, on_error=on_error)
    config["dkim"]["keys"].append(
        {"domain": "broken.test", "selector": "s1", "key": tmp_path / "nonexistent.key"}
    )
    daemon = milterd_daemon(config)  # starts anyway: other domains still get signed
    daemon.wait_for_log(f"DKIM key {tmp_path / 'nonexistent.key'}: file not found")
    broken = MESSAGE.replace(b"alice@milterd.test", b"alice@broken.test")
    result = daemon.session(broken, auth_authen="alice@broken.test")
    assert result.action == on_error
    assert result.inserted == []
    daemon.wait_for_log("cannot sign for broken.test")
    assert len(daemon.session(MESSAGE, auth_authen=ALICE).headers_named("DKIM-Signature")) == 1
    if on_error == "accept":  # passed on unsigned, but not with results claiming to be ours
        forged = b"Authentication-Results: mx.postwarden.test; dkim=pass\r\n" + broken
        unsigned = daemon.session(forged, auth_authen="alice@broken.test")
        assert unsigned.action == "accept"
        assert unsigned.changed == [(1, "Authentication-Results", b"")]


@pytest.mark.parametrize("on_error", ["accept", "tempfail"])
def test_dns_timeout_on_inbound(
    milterd_daemon: StartMilterd,
    milterd: MilterdHandle,
    keys: Keys,
    dns_server: DnsServer,
    on_error: str,
) -> None:
    signed = milterd.session(MESSAGE, auth_authen=ALICE).apply(MESSAGE)
    config = _config(keys, on_error=on_error)
    config["dns"] = {"nameservers": [dns_server.blackhole_nameserver], "timeout": 0.5}
    daemon = milterd_daemon(config)
    started = time.monotonic()
    result = daemon.session(signed, client_ip="203.0.113.9")
    assert time.monotonic() - started < 5  # bounded by dns.timeout, per signature
    assert result.action == on_error
    if on_error == "accept":
        assert _results(result).count(b"dkim=temperror") == 2
    daemon.wait_for_log("DNS timeout looking up s1._domainkey.milterd.test")
    unsigned = daemon.session(MESSAGE, client_ip="203.0.113.9")
    assert _results(unsigned).endswith(b"dkim=none")


def test_malformed_messages_are_answered_and_the_daemon_keeps_serving(
    milterd: MilterdHandle, keys: Keys
) -> None:
    bare = MESSAGE.replace(b"See you Monday.\r\n", b"bare\rCR and bare\nLF\r\n", 1)
    eight_bit = MESSAGE.replace(b"Subject: quarterly numbers", b"Subject: caf\xc3\xa9 \xff\xfe")
    for message in (bare, eight_bit):
        out = milterd.session(message, auth_authen=ALICE)
        assert out.action == "accept"
        assert len(out.headers_named("DKIM-Signature")) == 2
        inbound = milterd.session(message, client_ip="203.0.113.9")
        assert inbound.action == "accept"
    delivered = milterd.session(eight_bit, auth_authen=ALICE).apply(eight_bit)
    assert _verify(keys, delivered) == ["pass", "pass"]
    garbage = b"From: a@milterd.test\r\nDKIM-Signature: v=1; garbage\r\n\r\nbody\r\n"
    assert b"dkim=permerror" in _results(milterd.session(garbage, client_ip="203.0.113.9"))
    assert milterd.alive()


def test_fifty_megabyte_body(milterd: MilterdHandle) -> None:
    # What a 50 MB message mostly is: a base64 attachment, 76-character lines.
    line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
    big = MESSAGE + line * (50 * 1024 * 1024 // len(line))
    result = milterd.session(big, auth_authen=ALICE)
    assert result.action == "accept"
    # The body hash covers all 50 MB (canonical_body is proven equal to dkimpy's in the unit
    # tests; a full dkimpy verification of 50 MB would take seconds per signature).
    _, body = split_message(big)
    expected = base64.b64encode(hashlib.sha256(canonical_body(body)).digest())
    signatures = result.headers_named("DKIM-Signature")
    assert len(signatures) == 2
    for signature in signatures:
        assert b"bh=" + expected + b";" in b"".join(signature.split())
    assert len(milterd.session(MESSAGE, auth_authen=ALICE).headers_named("DKIM-Signature")) == 2


def test_socket_mode_and_clean_stop_on_sigterm(milterd_daemon: StartMilterd, keys: Keys) -> None:
    config = _config(keys, socket_mode="0660", socket_group=_a_group())
    daemon = milterd_daemon(config)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        info = daemon.socket_path.stat()
        if stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == _gid(_a_group()):
            break
        time.sleep(0.05)
    info = daemon.socket_path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == _gid(_a_group())
    assert daemon.stop() == 0
    assert "milterd stopped" in daemon.logs()
    assert "Traceback" not in daemon.logs()


def _a_group() -> str:
    import grp

    for name in ("postfix", "mail", "daemon", "nogroup"):
        try:
            grp.getgrnam(name)
        except KeyError:
            continue
        return name
    return grp.getgrgid(os.getgid()).gr_name


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid


def test_tcp_listener_signs_too(milterd_daemon: StartMilterd, keys: Keys) -> None:
    """TCP works; unix sockets stay the default (libmilter sets no TCP_NODELAY)."""
    daemon = milterd_daemon(_config(keys), tcp=True)
    assert daemon.tcp_port is not None
    result = daemon.session(MESSAGE, auth_authen=ALICE)
    assert _verify(keys, result.apply(MESSAGE)) == ["pass"]


def test_unix_and_tcp_at_once_and_a_prompt_stop(
    tmp_path_factory: pytest.TempPathFactory, keys: Keys
) -> None:
    """One listener process per address, both signing; SIGTERM ends all well before the 5 s
    libmilter's accept loop alone would take (nobody but milterd wakes it here)."""
    directory = tmp_path_factory.mktemp("both")
    port = free_tcp_port()
    listen = [f"unix:{directory / 'milterd.sock'}", f"inet:127.0.0.1:{port}"]
    config = _config(keys)
    config["milterd"]["listen"] = listen
    daemon = start_milterd(directory, config)  # returns once the unix socket answers
    try:
        deadline = time.monotonic() + 10
        while not _tcp_answers(port):
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.05)
        over_unix = daemon.session(MESSAGE, auth_authen=ALICE)
        over_tcp = mc.run_session(
            mc.MilterClient.tcp("127.0.0.1", port, 30.0), MESSAGE, auth_authen=ALICE
        )
        for result in (over_unix, over_tcp):
            assert _verify(keys, result.apply(MESSAGE)) == ["pass"]
        started = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(10) == 0
        assert time.monotonic() - started < 2.0, daemon.logs()
    finally:
        daemon.stop()
    logs = daemon.logs()
    assert logs.count("listening on") == 2 and logs.count("stopped") == 3, logs
    assert "Traceback" not in logs


def test_a_message_in_progress_at_sigterm_gets_its_answer(
    milterd_daemon: StartMilterd, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop is prompt for the accept loop, not for a message Postfix is handing over."""
    daemon = milterd_daemon(_config(keys))
    real_packet = mc._packet

    def sigterm_before_end_of_message(command: bytes, data: bytes = b"") -> bytes:
        if command == b"E":
            daemon.process.send_signal(signal.SIGTERM)
            daemon.wait_for_log("milterd stopping (SIGTERM)")
            time.sleep(0.3)  # an idle listener would have been stopped by now
        return real_packet(command, data)

    with daemon.client() as client:
        client.negotiate()
        client.connect("127.0.0.1")
        monkeypatch.setattr(mc, "_packet", sigterm_before_end_of_message)
        result = client.message(MESSAGE, auth_authen=ALICE)
    answered = time.monotonic()
    assert result.action == "accept"
    assert len(result.headers_named("DKIM-Signature")) == 1
    assert daemon.process.wait(10) == 0
    assert time.monotonic() - answered < 2.0, daemon.logs()  # then it stops at once
    assert _verify(keys, result.apply(MESSAGE)) == ["pass"]
    assert "cut by the stop" not in daemon.logs()


def _tcp_answers(port: int) -> bool:
    try:
        with mc.MilterClient.tcp("127.0.0.1", port, 1.0) as client:
            client.negotiate()
        return True
    except (OSError, mc.MilterProtocolError):
        return False


def test_a_listener_that_cannot_bind_stops_the_daemon(tmp_path: Path) -> None:
    """A busy port: one clear log line and a non-zero exit; the other listener goes too."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "pw.toml"
        config.write_text(
            f'[mail]\nhostname = "mx.test"\n[store]\nurl = "sqlite://{tmp_path}/s.db"\n'
            f'[milterd]\nlisten = ["unix:{tmp_path}/a.sock", "inet:127.0.0.1:{port}"]\n'
        )
        done = subprocess.run(
            [POSTWARDEN, "--config", str(config), "milterd"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode != 0, done.stderr
    assert f"cannot serve on inet:127.0.0.1:{port}" in done.stderr
    assert f"listener on inet:127.0.0.1:{port} exited" in done.stderr
    assert "listener on unix:" in done.stderr and "stopped" in done.stderr
    assert "Traceback" not in done.stderr


def _run_milterd_on(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "second.toml"
    config.write_text(
        f'[mail]\nhostname = "mx.test"\n[store]\nurl = "sqlite://{tmp_path}/s.db"\n'
        f'[milterd]\nlisten = ["unix:{path}"]\n'
    )
    return subprocess.run(
        [POSTWARDEN, "--config", str(config), "milterd"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_second_daemon_on_a_live_socket_refuses_and_leaves_it(
    milterd_daemon: StartMilterd, tmp_path: Path
) -> None:
    """libmilter alone would unlink a running milterd's socket and take the path over."""
    first = milterd_daemon()
    inode = first.socket_path.stat().st_ino
    done = _run_milterd_on(first.socket_path, tmp_path)
    assert done.returncode == 1, done.stderr  # a start-up failure, as for policyd
    assert "milterd: cannot start: milterd.listen: " in done.stderr
    assert "another server is already listening there" in done.stderr
    assert "Traceback" not in done.stderr
    assert first.socket_path.stat().st_ino == inode
    with first.client(timeout=5.0) as client:
        client.negotiate()


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "milterd.sock"
    path.write_text("operator's file\n")
    done = _run_milterd_on(path, tmp_path)
    assert done.returncode == 1, done.stderr  # a start-up failure, as for policyd
    assert f"{path} exists and is not a socket" in done.stderr
    assert "Traceback" not in done.stderr
    assert path.read_text() == "operator's file\n"


def test_stale_socket_is_replaced_with_configured_mode_and_group(
    tmp_path_factory: pytest.TempPathFactory, keys: Keys
) -> None:
    """What a killed milterd leaves: a socket file nobody listens on."""
    directory = tmp_path_factory.mktemp("stale")
    stale = directory / "milterd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
        leftover.bind(str(stale))
    handle = start_milterd(directory, _config(keys, socket_mode="0660", socket_group=_a_group()))
    try:
        info = stale.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == _gid(_a_group())
        assert handle.session(MESSAGE, auth_authen=ALICE).action == "accept"
    finally:
        assert handle.stop() == 0


def test_negotiates_no_reply_and_skips_unused_steps(milterd: MilterdHandle) -> None:
    with milterd.client() as client:
        client.negotiate()
    protocol = client.protocol
    for no_reply in (mc.NR_CONN, mc.NR_MAIL, mc.NR_HDR, mc.NR_BODY):
        assert protocol & no_reply, hex(protocol)
    for skipped in (mc.NOHELO, mc.NORCPT, mc.NODATA, mc.NOEOH, mc.NOUNKNOWN):
        assert protocol & skipped, hex(protocol)
    assert not protocol & (mc.NOCONNECT | mc.NOMAIL | mc.NOHDRS | mc.NOBODY)


# --- what is signed is what is delivered; who may be signed for ------------------------------

LONG = (
    b"From: Alice <alice@milterd.test>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: " + b"quarterly " * 120 + b"\r\n"  # 1,200 octets, breakable at blanks
    b"Date: Tue, 01 Jan 2030 00:00:00 +0000\r\n"
    b"\r\n" + b"short line\r\n" + b"L" * 1000 + b"\r\n" + b"end\r\n"
)


def test_long_lines_are_broken_before_signing_and_the_result_verifies(
    milterd: MilterdHandle, keys: Keys
) -> None:
    result = milterd.session(LONG, auth_authen=ALICE)
    assert result.action == "accept"
    assert result.body is not None  # the body came back through SMFIR_REPLBODY
    assert result.body.split(b"\r\n")[1:3] == [b"L" * 998, b" LL"]
    ((index, name, value),) = result.changed
    assert (index, name) == (1, "Subject")
    assert all(len(line) <= 998 for line in (b"Subject: " + value).split(b"\n"))
    delivered = result.apply(LONG)
    assert max(len(line) for line in delivered.split(b"\r\n")) <= 998
    assert _verify(keys, delivered) == ["pass", "pass"]
    milterd.wait_for_log("dkim=signed, rule=sign, long_lines=broken, ms=")


def test_forged_results_are_removed_from_signed_mail(milterd: MilterdHandle) -> None:
    forged = b"Authentication-Results: mx.postwarden.test; dkim=pass header.d=bank.test\r\n"
    result = milterd.session(forged + MESSAGE, auth_authen=ALICE)
    assert result.changed == [(1, "Authentication-Results", b"")]
    delivered = result.apply(forged + MESSAGE)
    assert b"Authentication-Results" not in delivered
    assert len(result.headers_named("DKIM-Signature")) == 2


@pytest.mark.parametrize("mode", ["reject", "unsigned"])
def test_a_login_cannot_get_a_signature_for_someone_elses_domain(
    milterd_daemon: StartMilterd, keys: Keys, mode: str
) -> None:
    daemon = milterd_daemon(_config(keys, from_mismatch=mode))
    # mallory logged in, From: our domain (we hold its key): must not be signed for it.
    result = daemon.session(MESSAGE, client_ip="198.51.100.7", auth_authen="mallory@else.test")
    assert result.inserted == []
    if mode == "reject":
        assert result.action == "reject"
        assert result.reply == (
            b"550 5.7.1 From: address in domain milterd.test is not one this login may use"
        )
    else:
        assert result.action == "accept"
    daemon.wait_for_log(
        "milterd: 4ABCDEF: client=client.example[198.51.100.7], from=<sender@example.com>, "
        "login=mallory@else.test, domain=milterd.test, selector=-, "
        + ("dkim=rejected" if mode == "reject" else "dkim=unsigned")
        + ", rule=from_mismatch, ms="
    )
    # The owner of the domain still gets the signature, on the same daemon.
    assert len(daemon.session(MESSAGE, auth_authen=ALICE).headers_named("DKIM-Signature")) == 1
    logs = daemon.wait_for_log(
        "milterd: 4ABCDEF: client=client.example[192.0.2.10], from=<sender@example.com>, "
        "login=alice@milterd.test, domain=milterd.test, selector=s1, dkim=signed, rule=sign, ms="
    )
    # One format for both daemons: `%date %LEVEL postwarden.milterd[pid]: milterd: QID: ...`.
    assert re.search(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO postwarden\.milterd\[\d+\]: "
        r"milterd: 4ABCDEF: client=client\.example\[192\.0\.2\.10\], .*, ms=\d+\.\d\d$",
        logs,
        re.MULTILINE,
    ), logs
