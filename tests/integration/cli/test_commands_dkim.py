"""`postwarden dkim keygen|dns|check` run as a user runs them, against the loopback DNS server."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from postwarden.config.model import DnsConfig
from postwarden.dkim.keys import quoted_txt
from postwarden.dkim.verification import make_dnsfunc, verify_message
from tests.fixtures.dns_server import DnsServer
from tests.fixtures.milterd_daemon import StartMilterd
from tests.fixtures.policyd_daemon import POSTWARDEN, to_toml

ZONE = "clidkim.test"


def _run(config: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    base = [POSTWARDEN] + (["--config", str(config)] if config else [])
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60, check=False)


def _write_config(path: Path, keys: list[dict[str, Any]], nameserver: str = "") -> Path:
    sections: dict[str, dict[str, Any]] = {"dkim": {"keys": keys}}
    if nameserver:
        sections["dns"] = {"nameservers": [nameserver], "timeout": 2.0}
    path.write_text(to_toml(sections), encoding="utf-8")
    return path


def _keygen(directory: Path, domain: str, selector: str, *extra: str) -> dict[str, Any]:
    done = _run(
        None,
        "dkim",
        "keygen",
        domain,
        "--selector",
        selector,
        "--directory",
        str(directory),
        "--json",
        *extra,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_keygen_writes_0600_key_and_prints_record_and_config(tmp_path: Path) -> None:
    done = _run(None, "dkim", "keygen", "Example.COM", "--directory", str(tmp_path))
    assert done.returncode == 0, done.stderr
    key = tmp_path / "example.com.s1.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert 's1._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=' in done.stdout
    assert '" "' in done.stdout  # a 2048-bit record needs two strings
    assert "[[dkim.keys]]" in done.stdout and f'key = "{key}"' in done.stdout
    again = _run(None, "dkim", "keygen", "example.com", "--directory", str(tmp_path))
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_keygen_ed25519_and_bits(tmp_path: Path) -> None:
    ed = _keygen(tmp_path, "example.com", "e1", "--algorithm", "ed25519")
    assert ed["value"].startswith("v=DKIM1; k=ed25519; p=")
    assert 'algorithm = "ed25519-sha256"' in ed["config"]
    big = _keygen(tmp_path, "example.com", "big", "--bits", "4096")
    assert all(len(s.encode()) <= 255 for s in big["strings"])
    assert "".join(big["strings"]) == big["value"]
    assert len(big["strings"]) == 3
    bad = _run(None, "dkim", "keygen", "example.com", "--bits", "512", "--directory", str(tmp_path))
    assert bad.returncode == 2


@pytest.mark.parametrize(
    ("domain", "selector", "error"),
    [
        ("example.com", "../../etc/x", "is not a selector"),
        ("example.com", "s 1", "is not a selector"),
        ("../example.com", "s1", "is not a domain name"),
    ],
)
def test_keygen_refuses_names_that_are_no_dns_names(
    tmp_path: Path, domain: str, selector: str, error: str
) -> None:
    """Both become the key's file name and the TXT record's name: nothing else gets through."""
    keys = tmp_path / "keys"
    done = _run(None, "dkim", "keygen", domain, "--selector", selector, "--directory", str(keys))
    assert done.returncode == 2, done.stdout
    assert error in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no key written anywhere


def test_dns_prints_opendkim_genkey_keys_as_opendkim_does(tmp_path: Path) -> None:
    subprocess.run(
        [
            "opendkim-genkey",
            "--directory",
            str(tmp_path),
            "--domain",
            "example.org",
            "--selector",
            "od",
        ],
        check=True,
        timeout=60,
    )
    config = _write_config(
        tmp_path / "pw.toml",
        [{"domain": "example.org", "selector": "od", "key": tmp_path / "od.private"}],
    )
    done = _run(config, "dkim", "dns", "example.org", "--json")
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(done.stdout)
    assert record["name"] == "od._domainkey.example.org"
    opendkim_txt = (tmp_path / "od.txt").read_text()
    opendkim_p = "".join(re.findall(r'"([^"]*)"', opendkim_txt)).split("p=")[1]
    assert record["value"].split("p=")[1] == opendkim_p
    text = _run(config, "dkim", "dns", "example.org")
    assert record["quoted"] in text.stdout and record["value"] in text.stdout


def test_dns_for_unconfigured_domain_or_bad_key_fails(tmp_path: Path) -> None:
    (tmp_path / "garbage.key").write_text("not a key")
    config = _write_config(
        tmp_path / "pw.toml",
        [{"domain": "example.org", "selector": "s1", "key": tmp_path / "garbage.key"}],
    )
    missing = _run(config, "dkim", "dns", "example.net")
    assert missing.returncode == 1
    assert "no [[dkim.keys]] entry for example.net" in missing.stderr
    bad = _run(config, "dkim", "dns", "example.org")
    assert bad.returncode == 1
    assert f"DKIM key {tmp_path / 'garbage.key'}" in bad.stderr


def test_check_says_whether_dns_publishes_the_key_on_disk(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    first = _keygen(tmp_path, ZONE, "s1")
    other = _keygen(tmp_path, ZONE, "other")
    config = _write_config(
        tmp_path / "pw.toml",
        [{"domain": ZONE, "selector": "s1", "key": first["key"]}],
        dns_server.nameserver,
    )
    dns_server.set_zone(ZONE, ["@ A 192.0.2.1"])
    absent = _run(config, "dkim", "check", ZONE)
    assert absent.returncode == 1
    assert f"MISSING  s1._domainkey.{ZONE}: no TXT record" in absent.stdout
    dns_server.set_zone(ZONE, [f"s1._domainkey TXT ( {quoted_txt(other['value'])} )"])
    wrong = _run(config, "dkim", "check", ZONE)
    assert wrong.returncode == 1
    assert "MISMATCH" in wrong.stdout
    dns_server.set_zone(ZONE, [f"s1._domainkey TXT ( {quoted_txt(first['value'])} )"])
    good = _run(config, "dkim", "check", ZONE, "--json")
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout) == [
        {"name": f"s1._domainkey.{ZONE}", "status": "ok", "detail": "DNS publishes the key on disk"}
    ]


def test_key_rotation_new_selector_beside_the_old(
    tmp_path: Path, dns_server: DnsServer, milterd_daemon: StartMilterd
) -> None:
    """The README's rotation steps: new key, publish, list it last, both check ok, new one signs."""
    old = _keygen(tmp_path, ZONE, "2025")
    new = _keygen(tmp_path, ZONE, "2026")
    dns_server.set_zone(
        ZONE,
        [
            f"2025._domainkey TXT ( {quoted_txt(old['value'])} )",
            f"2026._domainkey TXT ( {quoted_txt(new['value'])} )",
        ],
    )
    keys = [
        {"domain": ZONE, "selector": "2025", "key": old["key"]},
        {"domain": ZONE, "selector": "2026", "key": new["key"]},
    ]
    config = _write_config(tmp_path / "pw.toml", keys, dns_server.nameserver)
    listed = json.loads(_run(config, "dkim", "dns", ZONE, "--json").stdout)
    assert [r["selector"] for r in listed] == ["2025", "2026"]
    checked = _run(config, "dkim", "check", ZONE)
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.count("OK") == 2
    daemon = milterd_daemon(
        {"dkim": {"keys": keys}, "dns": {"nameservers": [dns_server.nameserver], "timeout": 2.0}}
    )
    message = f"From: a@{ZONE}\r\nTo: b@example.net\r\nSubject: rotated\r\n\r\nhi\r\n".encode()
    result = daemon.session(message, auth_authen=f"a@{ZONE}")
    (signature,) = result.headers_named("DKIM-Signature")
    assert b"s=2026;" in signature
    dnsfunc = make_dnsfunc(DnsConfig(nameservers=[dns_server.nameserver], timeout=2.0))
    assert [r.result for r in verify_message(result.apply(message), dnsfunc)] == ["pass"]


@pytest.mark.parametrize("command", ["keygen", "dns", "check"])
def test_help(command: str) -> None:
    done = _run(None, "dkim", command, "--help")
    assert done.returncode == 0
    assert "DOMAIN" in done.stdout
