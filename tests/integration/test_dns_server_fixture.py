"""The test DNS server itself: real NSD answers, and records published at runtime resolve."""

from __future__ import annotations

import time

import dns.resolver
import pytest

from tests.fixtures.dns_server import DNSBL_ZONE, DnsServer, DnsServerError


def test_serves_the_rfc5782_test_entry(dns_server: DnsServer) -> None:
    answer = dns_server.resolver().resolve(f"2.0.0.127.{DNSBL_ZONE}.", "A")
    assert [r.address for r in answer] == ["127.0.0.2"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        dns_server.resolver().resolve(f"1.0.0.127.{DNSBL_ZONE}.", "A")


def test_nameserver_string_names_address_and_port(dns_server: DnsServer) -> None:
    assert dns_server.nameserver == f"{dns_server.address}:{dns_server.port}"
    assert dns_server.address.startswith("127.0.0.")
    assert dns_server.port > 1024


def test_new_zone_published_at_runtime_resolves(dns_server: DnsServer) -> None:
    started = time.monotonic()
    dns_server.set_zone("runtime-new.test", ['@ TXT "hello"', "www A 192.0.2.77"])
    assert time.monotonic() - started < 5
    resolver = dns_server.resolver()
    assert [r.address for r in resolver.resolve("www.runtime-new.test.", "A")] == ["192.0.2.77"]
    txt = resolver.resolve("runtime-new.test.", "TXT")
    assert [b"".join(r.strings) for r in txt] == [b"hello"]


def test_records_added_and_removed_at_runtime(dns_server: DnsServer) -> None:
    dns_server.set_zone("runtime-edit.test", ["a A 192.0.2.1"])
    resolver = dns_server.resolver()
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("b.runtime-edit.test.", "A")
    dns_server.add_records("runtime-edit.test", ["b A 192.0.2.2"])
    assert [r.address for r in resolver.resolve("b.runtime-edit.test.", "A")] == ["192.0.2.2"]
    dns_server.remove_records("runtime-edit.test", ["b A 192.0.2.2"])
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("b.runtime-edit.test.", "A")
    # Many quick changes in a row are each served (no reload batching, no mtime races).
    for n in range(3, 8):
        dns_server.set_zone("runtime-edit.test", [f"a A 192.0.2.{n}"])
        assert [r.address for r in resolver.resolve("a.runtime-edit.test.", "A")] == [
            f"192.0.2.{n}"
        ]


def test_long_dkim_style_txt_record_is_served(dns_server: DnsServer) -> None:
    key = "A" * 400  # longer than one 255-byte character-string
    parts = " ".join(f'"{key[i : i + 200]}"' for i in range(0, len(key), 200))
    dns_server.set_zone(
        "runtime-dkim.test", [f's1._domainkey TXT ( "v=DKIM1; k=rsa; p=" {parts} )']
    )
    txt = dns_server.resolver().resolve("s1._domainkey.runtime-dkim.test.", "TXT")
    assert b"".join(txt[0].strings) == b"v=DKIM1; k=rsa; p=" + key.encode()


def test_bad_record_is_refused_with_the_reason(dns_server: DnsServer) -> None:
    with pytest.raises(DnsServerError, match="nsd-checkzone"):
        dns_server.set_zone("runtime-bad.test", ["www A not-an-address"])
    # The refused zone left nothing half-published: the same name can then be created.
    dns_server.set_zone("runtime-bad.test", ["www A 192.0.2.9"])
    answer = dns_server.resolver().resolve("www.runtime-bad.test.", "A")
    assert [r.address for r in answer] == ["192.0.2.9"]


def test_blackhole_nameserver_never_answers(dns_server: DnsServer) -> None:
    host, port = dns_server.blackhole_nameserver.split(":")
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)
    resolver.lifetime = 0.3
    before = dns_server.blackhole_queries
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolver.resolve("anything.test.", "A")
    deadline = time.monotonic() + 2
    while dns_server.blackhole_queries == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dns_server.blackhole_queries > before


def test_mail_domain_records_for_dns_checks(dns_server: DnsServer) -> None:
    # What `postwarden check dns` and the DKIM tests publish: A, MX, SPF, DMARC and PTR.
    dns_server.set_zone(
        "runtime-mail.test",
        [
            "@ A 192.0.2.25",
            "@ MX 10 mail.runtime-mail.test.",
            "mail A 192.0.2.25",
            '@ TXT "v=spf1 mx -all"',
            '_dmarc TXT "v=DMARC1; p=reject"',
        ],
    )
    dns_server.set_zone("2.0.192.in-addr.arpa", ["25 PTR mail.runtime-mail.test."])
    resolver = dns_server.resolver()
    mx = resolver.resolve("runtime-mail.test.", "MX")
    assert [str(r.exchange) for r in mx] == ["mail.runtime-mail.test."]
    ptr = resolver.resolve_address("192.0.2.25")
    assert [str(r.target) for r in ptr] == ["mail.runtime-mail.test."]
    dmarc = resolver.resolve("_dmarc.runtime-mail.test.", "TXT")
    assert [b"".join(r.strings) for r in dmarc] == [b"v=DMARC1; p=reject"]
