"""`postwarden check dns` against a real authoritative DNS server (NSD) on loopback."""

from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cli.main import cli
from postwarden.dns.readiness_report import dkim_record
from tests.fixtures.dns_server import DnsServer

IP = "192.0.2.25"


def make_key(path: Path) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return dkim_record(path.read_bytes())


def zone_txt(value: str) -> str:
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
    return "( " + " ".join(f'"{c}"' for c in chunks) + " )"


def write_config(
    tmp_path: Path, domain: str, nameserver: str, key: Path, timeout: float = 1.0
) -> Path:
    path = tmp_path / "postwarden.toml"
    path.write_text(
        f'[mail]\nhostname = "mx.{domain}"\nmain_domain = "{domain}"\n\n'
        f'[dns]\nnameservers = ["{nameserver}"]\ntimeout = {timeout}\n\n'
        f'[[dkim.keys]]\ndomain = "{domain}"\nselector = "s1"\nkey = "{key}"\n'
    )
    return path


def check(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), "check", "dns", *args])


def test_fully_published_domain_scores_ten(dns_server: DnsServer, tmp_path: Path) -> None:
    domain = "ready.test"
    record = make_key(tmp_path / "dkim.key")
    dns_server.set_zone(
        domain,
        [
            f"@ A {IP}",
            "@ MX 10 mx",
            f"mx A {IP}",
            '@ TXT "v=spf1 a mx -all"',
            f"s1._domainkey TXT {zone_txt(record)}",
            '_dmarc TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@ready.test"',
        ],
    )
    dns_server.set_zone("2.0.192.in-addr.arpa", ["25 PTR mx.ready.test."])
    config = write_config(tmp_path, domain, dns_server.nameserver, tmp_path / "dkim.key")

    done = check(config, domain, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["ip"] == IP  # found through mx.ready.test's A record
    assert report["score"] == 10
    assert all(c["passed"] for c in report["checks"])

    text = check(config, domain)
    assert "[pass] PTR" in text.output
    assert text.output.rstrip().endswith("score: 10/10")


def test_bare_domain_fails_each_check_with_what_to_publish(
    dns_server: DnsServer, tmp_path: Path
) -> None:
    domain = "bare.test"
    bare_ip = "192.0.2.26"  # no PTR published for it
    record = make_key(tmp_path / "dkim.key")
    dns_server.set_zone(domain, [f"@ A {bare_ip}", 's1._domainkey TXT "v=DKIM1; k=rsa; p=OLDKEY"'])
    config = write_config(tmp_path, domain, dns_server.nameserver, tmp_path / "dkim.key")

    done = check(config, domain, "--ip", bare_ip)
    assert done.exit_code == 1
    out = done.output
    assert "[pass] A" in out
    assert "[FAIL] MX" in out and "publish: bare.test. IN MX 10 mx.bare.test." in out
    assert "[FAIL] SPF" in out and 'publish: bare.test. IN TXT "v=spf1 a mx -all"' in out
    assert "[FAIL] DKIM" in out and "published key differs" in out
    # The DKIM record to publish is the configured key's, split into 255-byte strings.
    published = "".join(
        re.findall(r'"([^"]*)"', out.split("publish: s1._domainkey.bare.test.")[1].splitlines()[0])
    )
    assert published == record
    assert "[FAIL] DMARC" in out and "v=DMARC1; p=quarantine" in out
    assert out.rstrip().endswith("score: 1/10")


def test_unanswering_nameserver_fails_checks_without_traceback(
    dns_server: DnsServer, tmp_path: Path
) -> None:
    make_key(tmp_path / "dkim.key")
    config = write_config(
        tmp_path, "slow.test", dns_server.blackhole_nameserver, tmp_path / "dkim.key", timeout=0.2
    )
    done = check(config, "slow.test", "--ip", IP, "--json")
    assert done.exit_code == 1
    report = json.loads(done.output)
    assert report["score"] == 0
    assert all(c["found"].startswith("lookup failed") for c in report["checks"]), report
    # Without --ip the gateway's own address cannot be looked up either: said so, not "no IP".
    no_ip = json.loads(check(config, "slow.test", "--json").output)
    ptr = next(c for c in no_ip["checks"] if c["check"] == "PTR")
    assert ptr["found"].startswith("lookup failed"), ptr


def test_bad_domain_is_a_usage_error(dns_server: DnsServer, tmp_path: Path) -> None:
    make_key(tmp_path / "dkim.key")
    config = write_config(tmp_path, "x.test", dns_server.nameserver, tmp_path / "dkim.key")
    done = check(config, "not a domain")
    assert done.exit_code == 2
    assert "is not a domain name" in done.output
