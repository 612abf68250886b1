"""milterd's Prometheus metrics as the real daemon serves them, summed over its listeners.

Two listener processes (two unix sockets) each take messages over the milter protocol;
one scrape of `milterd.metrics_listen` must count them all. Stopping leaves no process,
no port and no multiprocess directory behind; a port in use stops the start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from postwarden.dkim.keys import generate_key, quoted_txt, txt_record, write_key
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.milter_client import MilterClient, run_session
from tests.fixtures.milterd_daemon import start_milterd
from tests.fixtures.policyd_daemon import POSTWARDEN, free_tcp_port

ZONE = "milterdmetrics.test"
LOGIN = f"alice@{ZONE}"
MESSAGE = (
    f"From: Alice <{LOGIN}>\r\nTo: <bob@example.net>\r\nSubject: counted\r\n"
    f"Date: Tue, 01 Jan 2030 00:00:00 +0000\r\nMessage-ID: <m1@{ZONE}>\r\n\r\n"
    "One message, counted once.\r\n"
).encode()
NO_FROM = b"To: <bob@example.net>\r\nSubject: whose?\r\n\r\nNo From: to sign for.\r\n"
STOP_WAIT = 10.0


def scrape(host: str, port: int) -> str:
    """The metrics page; the port is bound before milterd answers, so one try is enough."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples carrying every one of `labels`."""
    total = 0.0
    for line in text.splitlines():
        metric, _, rest = line.partition("{") if "{" in line else line.partition(" ")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
    return [int(p) for p in text.split()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_one_scrape_counts_the_messages_of_every_listener_and_the_stop_leaves_nothing(
    tmp_path: Path, dns_server: DnsServer, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    key = generate_key("rsa-sha256")
    write_key(key, tmp_path / "s1.key")
    dns_server.set_zone(ZONE, [f"s1._domainkey TXT ( {quoted_txt(txt_record(key))} )"])
    # The daemon's multiprocess directory goes under TMPDIR: here, to see it removed.
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    port = free_tcp_port()
    second = tmp_path / "second.sock"
    daemon = start_milterd(
        tmp_path,
        {
            "milterd": {
                "listen": [f"unix:{tmp_path / 'milterd.sock'}", f"unix:{second}"],
                "metrics_listen": f"{host}:{port}",
            },
            "dkim": {"keys": [{"domain": ZONE, "selector": "s1", "key": tmp_path / "s1.key"}]},
            "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0},
        },
    )
    try:
        deadline = time.monotonic() + 10
        while not second.exists():
            assert time.monotonic() < deadline, daemon.logs()
            time.sleep(0.05)
        listeners = _children(daemon.process.pid)
        assert len(listeners) == 2
        before = scrape(host, port)
        assert sample(before, "postwarden_milter_messages_total") == 0

        signed = daemon.session(MESSAGE, client_ip="198.51.100.7", auth_authen=LOGIN)
        assert len(signed.headers_named("DKIM-Signature")) == 1
        verified = run_session(
            MilterClient.unix(str(second)), signed.apply(MESSAGE), client_ip="203.0.113.9"
        )
        assert b"dkim=pass" in verified.headers_named("Authentication-Results")[0]
        # Trusted (loopback), no login, no From: to sign for: on_error (accept), not decided.
        fault = run_session(MilterClient.unix(str(second)), NO_FROM, client_ip="127.0.0.1")
        assert fault.action == "accept" and fault.inserted == []

        text = scrape(host, port)
        messages = "postwarden_milter_messages_total"
        assert sample(text, messages, rule="sign", dkim="signed") == 1
        assert sample(text, messages, rule="verify", dkim="pass") == 1
        assert sample(text, messages) == 2
        assert sample(text, "postwarden_milter_message_seconds_count") == 2
        assert sample(text, "postwarden_milter_errors_total", kind="fault") == 1
        assert sample(text, "postwarden_milter_errors_total", kind="internal") == 0
        assert len(list(temp.iterdir())) == 1  # the multiprocess directory, while running

        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(STOP_WAIT) == 0, daemon.logs()
    finally:
        daemon.stop()
    assert all(_gone(pid) for pid in listeners)
    with pytest.raises(OSError):
        scrape(host, port)
    assert list(temp.iterdir()) == []
    logs = daemon.logs()
    assert "milterd stopped" in logs and "Traceback" not in logs, logs


def test_a_metrics_port_in_use_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "pw.toml"
        config.write_text(
            f'[mail]\nhostname = "mx.test"\n[store]\nurl = "sqlite://{tmp_path}/s.db"\n'
            f'[milterd]\nlisten = ["unix:{tmp_path}/m.sock"]\n'
            f'metrics_listen = "127.0.0.1:{port}"\n'
        )
        done = subprocess.run(
            [POSTWARDEN, "--config", str(config), "milterd"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert (
        f"milterd: cannot start: milterd.metrics_listen: cannot listen on 127.0.0.1:{port}: "
        in done.stderr
    )
    assert "listening on" not in done.stderr  # no listener was started
    assert not (tmp_path / "m.sock").exists()
    assert "Traceback" not in done.stderr
