"""List entries: every accepted form, refusals with reasons, matching, and flat lookup cost."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from postwarden.policy.list_entries import (
    CompiledLists,
    InvalidEntry,
    ListIndex,
    parse_entry,
    sender_parts,
)
from postwarden.policy.records import ListChange, ListEntry, ListName


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("192.0.2.1", "192.0.2.1"),
        (" 192.0.2.1 ", "192.0.2.1"),
        ("192.0.2.1/32", "192.0.2.1"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),  # host bits cleared: the network is what matches
        ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
        ("192.168.2.0:255.255.255.0", "192.168.2.0/24"),
        ("192.168.3.1:255.255.255.128", "192.168.3.0/25"),
        ("192.168.5.32:255.255.255.192", "192.168.5.0/26"),
        ("192.168.1.*", "192.168.1.0/24"),
        ("192.168.*", "192.168.0.0/16"),
        ("10.*", "10.0.0.0/8"),
        ("10.*.*.*", "10.0.0.0/8"),
        ("2001:DB8:10FF::AE:44F2", "2001:db8:10ff::ae:44f2"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8::1/128", "2001:db8::1"),
        ("2001:db8:1:2::5/64", "2001:db8:1:2::/64"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("J.Smith@Test.com", "j.smith@test.com"),
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        (".example.com", ".example.com"),
        (".xyz", ".xyz"),
    ],
)
def test_every_entry_form_has_one_canonical_spelling(text: str, canonical: str) -> None:
    assert parse_entry(text) == canonical
    assert parse_entry(canonical) == canonical


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty entry"),
        ("192.168.*.5", "trailing octets"),
        ("192.168.1*", "whole octet"),
        ("*", "every address"),
        ("1.2.3.4.*", "at most four octets"),
        ("1.2.3.400", "not a valid IP address"),
        ("1.2.3", "not a valid IP address"),
        ("10.0.0.0/33", "longer than 32 bits"),
        ("2001:db8::/129", "longer than 128 bits"),
        ("10.0.0.0/x", "prefix length"),
        ("192.168.2.0:255.0.255.0", "not contiguous"),
        ("192.168.2.0:255.255.255", "dotted netmask"),
        ("fe80::1%eth0", "zone"),
        ("2001:db8::g", "not a valid IP address"),
        ("@example.com", "local part"),
        ("j.smith@", "domain after"),
        ("j smith@test.com", "space"),
        ("j.smith@.test.com", "cannot start with"),
        ("localhost", "at least one dot"),
        ("exa mple.com", "space"),
        ("ex..ample.com", "empty label"),
        ("-bad.example.com", "not a valid domain label"),
        ("bücher.de", "ASCII"),
        ("x" * 400, "longer than"),
    ],
)
def test_invalid_entries_say_why_and_what_is_allowed(text: str, reason: str) -> None:
    with pytest.raises(InvalidEntry) as caught:
        parse_entry(text)
    assert reason in str(caught.value)
    assert reason in caught.value.reason
    assert "allowed:" in str(caught.value)


@given(st.text(max_size=80))
def test_parse_entry_refuses_only_with_invalid_entry(text: str) -> None:
    try:
        canonical = parse_entry(text)
    except InvalidEntry:
        return
    assert parse_entry(canonical) == canonical  # canonical forms are fixed points
    ListIndex([canonical])  # and every canonical form compiles


@given(st.from_regex(r"\.?[a-z0-9-]{1,4}(\.[a-z0-9-]{1,4}){1,3}", fullmatch=True))
def test_every_accepted_name_compiles_and_matches_itself(text: str) -> None:
    # Domain-shaped text, which random text hardly ever is (mail.host1 once failed to compile).
    try:
        canonical = parse_entry(text)
    except InvalidEntry:
        return
    index = ListIndex([canonical])
    if not canonical.replace(".", "").isdigit():
        assert index.contains_domain(canonical) or index.contains_domain("x" + canonical)


@given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
def test_any_network_matches_its_own_addresses(ip: ipaddress._BaseAddress, prefix: int) -> None:
    assert isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    # An IPv4-mapped client is an IPv4 client: only IPv4 entries (or ::ffff: ones) match it.
    assume(not (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped and prefix < 96))
    prefix = min(prefix, ip.max_prefixlen)
    index = ListIndex([parse_entry(f"{ip}/{prefix}")])
    assert index.contains_ip(str(ip))
    assert index.contains_ip(ip)


def test_ip_matching_covers_hosts_networks_and_wildcards() -> None:
    index = ListIndex(
        parse_entry(e)
        for e in ["192.0.2.1", "10.0.0.0/8", "192.168.1.*", "2001:db8::/32", "2001:db8:ffff::1"]
    )
    assert index.contains_ip("192.0.2.1")
    assert not index.contains_ip("192.0.2.2")
    assert index.contains_ip("10.255.1.1")
    assert not index.contains_ip("11.0.0.1")
    assert index.contains_ip("192.168.1.77")
    assert not index.contains_ip("192.168.2.77")
    assert index.contains_ip("2001:db8:1::5")
    assert not index.contains_ip("2001:db9::5")
    assert index.contains_ip(ipaddress.ip_address("10.1.1.1"))
    assert not index.contains_ip("not-an-ip")
    assert not index.contains_ip("")


def test_ipv4_mapped_client_addresses_match_ipv4_entries() -> None:
    index = ListIndex([parse_entry("192.168.1.*"), parse_entry("::ffff:203.0.113.9")])
    assert index.contains_ip("::ffff:192.168.1.5")
    assert index.contains_ip(ipaddress.ip_address("::ffff:192.168.1.5"))
    assert index.contains_ip("203.0.113.9")
    assert index.contains_ip("::ffff:203.0.113.9")
    assert not index.contains_ip("::ffff:192.168.2.5")


def test_mailboxes_match_case_insensitively() -> None:
    index = ListIndex([parse_entry("J.Smith@Test.com")])
    assert index.contains_mailbox("j.smith@test.com")
    assert index.contains_mailbox("J.SMITH@TEST.COM")
    assert not index.contains_mailbox("r.johnson@test.com")
    assert not index.contains_mailbox("")


def test_domain_is_exact_and_dot_domain_is_its_subdomains_only() -> None:
    index = ListIndex([parse_entry("example.com"), parse_entry(".example.org")])
    assert index.contains_domain("example.com")
    assert index.contains_domain("EXAMPLE.com")
    assert not index.contains_domain("mail.example.com")
    assert index.contains_domain("mail.example.org")
    assert index.contains_domain("a.b.example.org")
    assert not index.contains_domain("example.org")
    assert not index.contains_domain("badexample.org")
    assert not index.contains_domain("")


def test_domain_entries_do_not_match_ips_and_ip_entries_do_not_match_names() -> None:
    index = ListIndex([parse_entry("example.com"), parse_entry("10.0.0.1")])
    assert not index.contains_ip("192.0.2.1")
    assert not index.contains_domain("10.0.0.1")


@pytest.mark.parametrize("name", ["mail.host1", "mx2.example.k8s1", "a.b-2"])
def test_every_accepted_domain_can_be_compiled_and_matched(name: str) -> None:
    # A domain may end in a digit; only an all-digit last label is refused (it reads as IP).
    entry = parse_entry(name)
    index = ListIndex([entry])
    assert index.contains_domain(name)
    assert not index.contains_ip("10.0.0.1")
    assert index.remove(entry)
    assert len(index) == 0


def _lengths(index: ListIndex) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return index.prefix_lengths


def test_incremental_add_and_remove_keep_only_present_prefix_lengths() -> None:
    index = ListIndex()
    assert index.add("10.0.0.0/8")
    assert not index.add("10.0.0.0/8")  # already present
    assert index.add("10.1.0.0/16")
    assert index.add(".example.com")
    assert index.add("j@example.com")
    assert len(index) == 4
    assert _lengths(index) == ((16, 8), ())
    assert index.remove("10.0.0.0/8")
    assert not index.remove("10.0.0.0/8")
    assert _lengths(index) == ((16,), ())
    assert index.contains_ip("10.1.2.3")
    assert not index.contains_ip("10.2.2.3")
    assert index.remove(".example.com")
    assert not index.contains_domain("www.example.com")
    assert index.remove("j@example.com")
    assert not index.remove("j@example.com")
    assert index.remove("10.1.0.0/16")
    assert _lengths(index) == ((), ())
    assert len(index) == 0


def test_a_non_canonical_entry_is_refused_by_the_index() -> None:
    with pytest.raises(InvalidEntry):
        ListIndex().add("10.1.2.3/8")


def test_compiled_lists_follow_the_change_log() -> None:
    lists = CompiledLists.from_entries(
        [
            ListEntry(ListName.PERMITTED, "10.128.0.3"),
            ListEntry(ListName.FORBIDDEN, "j.smith@test.com", "spam"),
            ListEntry(ListName.FORBIDDEN, "10.1.2.3/8"),  # hand-edited junk: skipped, logged
        ]
    )
    assert lists.permitted.contains_ip("10.128.0.3")
    assert lists.forbidden.contains_mailbox("j.smith@test.com")
    assert len(lists.forbidden) == 1
    lists.apply(
        [
            ListChange(1, "add", ListEntry(ListName.FORBIDDEN, "192.168.130.3")),
            ListChange(2, "remove", ListEntry(ListName.FORBIDDEN, "j.smith@test.com")),
            ListChange(3, "add", ListEntry(ListName.PERMITTED, ".example.com")),
        ]
    )
    assert lists.forbidden.contains_ip("192.168.130.3")
    assert not lists.forbidden.contains_mailbox("j.smith@test.com")
    assert lists.permitted.contains_domain("www.example.com")


@pytest.mark.parametrize(
    ("sender", "parts"),
    [
        ("J.Smith@Test.COM", ("j.smith@test.com", "test.com")),
        ("<j@example.com>", ("j@example.com", "example.com")),
        ("", ("", "")),
        ("<>", ("", "")),
        ("root", ("root", "")),
    ],
)
def test_sender_parts(sender: str, parts: tuple[str, str]) -> None:
    assert sender_parts(sender) == parts


def _build_large_index(count: int) -> ListIndex:
    """`count` entries in the shapes real lists hold: hosts, networks, mailboxes, domains."""
    index = ListIndex()
    hosts = count * 6 // 10
    for i in range(hosts):
        index.add(f"{10 + (i >> 24)}.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}")
    for i in range(count // 10):
        index.add(f"{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}.0/24")
    for i in range(count // 10):
        index.add(f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::/64")
    for i in range(count // 10):
        index.add(f"user{i}@example{i % 1000}.com")
    for i in range(count - len(index)):
        index.add(f".d{i}.example" if i % 2 else f"d{i}.example")
    return index


def _lookup_seconds(index: ListIndex) -> float:
    """Best-of-5 time of a fixed mix of hitting and missing lookups."""
    probes_ip = ["10.0.0.5", "100.0.0.9", "2001:db8::1", "203.0.113.7", "::ffff:10.0.0.7"]
    probes_domain = ["a.b.c.d1.example", "d2.example", "nothing.example.net"]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(400):
            for ip in probes_ip:
                index.contains_ip(ip)
            for domain in probes_domain:
                index.contains_domain(domain)
            index.contains_mailbox("user5@example5.com")
        best = min(best, time.perf_counter() - start)
    return best


def test_a_million_entries_build_quickly_and_cost_the_same_to_query_as_ten() -> None:
    small = _build_large_index(10)
    start = time.perf_counter()
    large = _build_large_index(1_000_000)
    build_seconds = time.perf_counter() - start
    assert len(large) == 1_000_000
    assert build_seconds < 30  # a few seconds here; generous for a slow CI machine
    # The work a lookup does: one probe per prefix length present, not per entry.
    assert large.prefix_lengths == ((32, 24), (64,))
    assert small.prefix_lengths == large.prefix_lengths
    assert large.contains_ip("10.0.3.232")
    assert large.contains_ip("100.1.2.3")
    assert large.contains_ip("2001:db8:1:869f::77")
    assert large.contains_mailbox("user99999@example999.com")
    assert large.contains_domain("x.d1.example")
    assert not large.contains_ip("203.0.113.7")
    # Same operations, same cost: allow a wide margin for cache effects, never a tight bound.
    assert _lookup_seconds(large) < 5 * _lookup_seconds(small) + 0.01
