"""Greylisting on a fake clock: delay, retry window, expiry, auto-whitelist, large senders."""

from __future__ import annotations

from pathlib import Path

import pytest

from postwarden.config.model import GreylistingConfig
from postwarden.policy.greylisting import (
    NETWORK_TOUCH_INTERVAL,
    GreylistDecision,
    InvalidClientAddress,
    LargeSendersError,
    client_network,
    decide,
    load_large_senders,
    normalise_sender,
    parse_large_senders,
    triplet_key,
)
from postwarden.policy.records import ClientNetworkRecord, TripletRecord
from postwarden.policy.verdict import Action, Rule

T0 = 1_700_000_000.0
CFG = GreylistingConfig(delay=300, retry_window=2 * 86400, expiry=35 * 86400)


class FakeStore:
    """The two records of one triplet, written back as the pipeline does."""

    def __init__(self) -> None:
        self.triplet: TripletRecord | None = None
        self.network: ClientNetworkRecord | None = None

    def attempt(
        self, now: float, cfg: GreylistingConfig = CFG, *, exempt: bool = False
    ) -> GreylistDecision:
        decision = decide(self.triplet, self.network, now, cfg, exempt=exempt)
        if decision.triplet_record is not None:
            self.triplet = decision.triplet_record
        if decision.network_record is not None:
            self.network = decision.network_record
        return decision


def test_first_attempt_is_deferred_with_4_7_1() -> None:
    decision = FakeStore().attempt(T0)
    assert decision.verdict.action is Action.DEFER_IF_PERMIT
    assert decision.verdict.rule is Rule.GREYLIST_DEFER
    assert decision.verdict.enhanced_code == "4.7.1"
    assert decision.verdict.text == CFG.defer_text
    assert decision.triplet_record == TripletRecord(T0, T0, 0)


def test_early_retry_is_deferred_and_does_not_restart_the_delay() -> None:
    store = FakeStore()
    store.attempt(T0)
    early = store.attempt(T0 + 299)
    assert early.verdict.rule is Rule.GREYLIST_DEFER
    assert store.triplet is not None and store.triplet.first_seen == T0
    assert store.attempt(T0 + 300).verdict.rule is Rule.GREYLIST_PASS


def test_retry_after_the_delay_passes_with_an_x_greylist_header() -> None:
    store = FakeStore()
    store.attempt(T0)
    decision = store.attempt(T0 + 420)
    assert decision.verdict.action is Action.PREPEND
    assert decision.verdict.rule is Rule.GREYLIST_PASS
    assert decision.verdict.text == (
        "X-Greylist: delayed 420 seconds by postwarden; Tue, 14 Nov 2023 22:20:20 GMT"
    )
    assert decision.triplet_record == TripletRecord(T0, T0 + 420, 1)
    assert decision.network_record == ClientNetworkRecord(1, T0 + 420)


def test_later_messages_of_a_passed_triplet_are_accepted_without_header() -> None:
    store = FakeStore()
    store.attempt(T0)
    store.attempt(T0 + 400)
    later = store.attempt(T0 + 86400)
    assert later.verdict.action is Action.DUNNO
    assert later.verdict.rule is Rule.GREYLIST_KNOWN
    assert store.triplet == TripletRecord(T0, T0 + 86400, 2)


def test_pass_without_header_when_add_header_is_off() -> None:
    cfg = CFG.model_copy(update={"add_header": False})
    store = FakeStore()
    store.attempt(T0, cfg)
    decision = store.attempt(T0 + 400, cfg)
    assert (decision.verdict.action, decision.verdict.rule) == (Action.DUNNO, Rule.GREYLIST_PASS)


def test_retry_after_the_retry_window_starts_over() -> None:
    store = FakeStore()
    store.attempt(T0)
    last_chance = T0 + 300 + 2 * 86400
    too_late = last_chance + 1
    restarted = store.attempt(too_late)
    assert restarted.verdict.rule is Rule.GREYLIST_DEFER
    assert store.triplet == TripletRecord(too_late, too_late, 0)
    assert store.attempt(too_late + 299).verdict.rule is Rule.GREYLIST_DEFER
    assert store.attempt(too_late + 300).verdict.rule is Rule.GREYLIST_PASS


def test_a_passed_triplet_is_forgotten_after_expiry() -> None:
    store = FakeStore()
    store.attempt(T0)
    store.attempt(T0 + 400)
    still_known = T0 + 400 + 35 * 86400 - 1  # gone at expiry itself, as the store's ttl
    assert store.attempt(still_known).verdict.rule is Rule.GREYLIST_KNOWN
    forgotten = still_known + 35 * 86400 + 1
    assert store.attempt(forgotten).verdict.rule is Rule.GREYLIST_DEFER
    assert store.triplet == TripletRecord(forgotten, forgotten, 0)


def test_client_network_is_auto_whitelisted_after_n_passes() -> None:
    cfg = CFG.model_copy(update={"auto_whitelist_after": 2})
    network = ClientNetworkRecord(0, T0)
    # Two different triplets from one network pass greylisting...
    for _ in range(2):
        first = decide(None, network, T0, cfg, exempt=False)
        assert first.triplet_record is not None
        passed = decide(first.triplet_record, network, T0 + 400, cfg, exempt=False)
        assert passed.network_record is not None
        network = passed.network_record
    assert network.passes == 2
    # ...so a third, never-seen triplet from it is accepted at once, and nothing new is stored.
    decision = decide(None, network, T0 + 500, cfg, exempt=False)
    assert decision.verdict.rule is Rule.GREYLIST_KNOWN
    assert decision.triplet_record is None
    assert decision.network_record is None  # last_seen is recent: no write needed
    # Later on, a pass refreshes last_seen so the whitelisting does not expire while in use.
    later = T0 + 400 + NETWORK_TOUCH_INTERVAL
    touched = decide(None, network, later, cfg, exempt=False)
    assert touched.verdict.rule is Rule.GREYLIST_KNOWN
    assert touched.network_record == ClientNetworkRecord(2, later)


def test_auto_whitelist_off_and_stale_network_records() -> None:
    off = CFG.model_copy(update={"auto_whitelist_after": 0})
    busy = ClientNetworkRecord(1000, T0)
    assert decide(None, busy, T0, off, exempt=False).verdict.rule is Rule.GREYLIST_DEFER
    on = CFG.model_copy(update={"auto_whitelist_after": 5})
    stale = T0 + 35 * 86400 + 1
    assert decide(None, busy, stale, on, exempt=False).verdict.rule is Rule.GREYLIST_DEFER


def test_large_senders_are_exempt_and_nothing_is_stored() -> None:
    decision = decide(None, None, T0, CFG, exempt=True)
    assert decision == GreylistDecision(decision.verdict)
    assert (decision.verdict.action, decision.verdict.rule) == (Action.DUNNO, Rule.GREYLIST_EXEMPT)


@pytest.mark.parametrize(
    ("sender", "normalised"),
    [
        ("J.Smith@Example.COM", "j.smith@example.com"),
        ("<j.smith@example.com>", "j.smith@example.com"),
        ("", ""),
        ("<>", ""),
        # BATV: the tag changes with every message.
        ("prvs=234d5777c=ross.lagerwall@citrix.com", "ross.lagerwall@citrix.com"),
        ("prvs=9905c7c8d6=ms@dev.tdt.de", "ms@dev.tdt.de"),
        ("prvs=joe=1234abcdef@example.com", "joe@example.com"),
        ("btv1==0123abcd==joe@example.com", "joe@example.com"),
        ("msprvs1=19876abcdef=bf-abc@example.com", "bf-abc@example.com"),
        # SRS: the original sender, behind any forwarder.
        ("SRS0=Kjsf=5O=example.org=alice@forwarder.net", "alice@example.org"),
        ("SRS0+Kjsf=5O=example.org=alice@forwarder.net", "alice@example.org"),
        ("SRS1=x1y2=first.net==Kjsf=5O=example.org=alice@second.net", "alice@example.org"),
        (
            "SRS0=Kjsf=5O=citrix.com=prvs=374a1453b=Andrew.Cooper3@srs-se1.protection.inumbo.net",
            "andrew.cooper3@citrix.com",
        ),
        # VERP-style, as postgrey does it: +extension dropped, whole numbers become '#'.
        ("list-bounces+user=example.org@lists.example.net", "list-bounces@lists.example.net"),
        ("bounce-123-4567@mailer.example.com", "bounce-#-#@mailer.example.com"),
        ("user123@example.com", "user123@example.com"),
        ("root", "root"),
    ],
)
def test_sender_normalisation(sender: str, normalised: str) -> None:
    assert normalise_sender(sender) == normalised


def test_two_verp_bounces_share_one_triplet() -> None:
    network = client_network("192.0.2.5")
    a = triplet_key(network, normalise_sender("bounce-1001@m.example"), "Bob@Example.org")
    b = triplet_key(network, normalise_sender("bounce-1002@m.example"), "bob@example.org")
    assert a == b == "192.0.2.0/24 bounce-#@m.example bob@example.org"


@pytest.mark.parametrize(
    ("ip", "v4", "v6", "network"),
    [
        ("192.0.2.77", 24, 64, "192.0.2.0/24"),
        ("::ffff:192.0.2.77", 24, 64, "192.0.2.0/24"),
        ("192.0.2.77", 32, 64, "192.0.2.77/32"),
        ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 24, 48, "2001:db8:1::/48"),
    ],
)
def test_client_network_groups_addresses(ip: str, v4: int, v6: int, network: str) -> None:
    assert client_network(ip, v4, v6) == network


def test_ipv6_clients_of_one_64_share_a_triplet() -> None:
    assert client_network("2001:db8::1") == client_network("2001:db8::ffff:1")
    assert client_network("2001:db8::1") != client_network("2001:db8:0:1::1")


def test_client_network_refuses_a_non_address() -> None:
    with pytest.raises(InvalidClientAddress):
        client_network("unknown")


def test_shipped_large_senders_cover_google_and_microsoft() -> None:
    senders = load_large_senders()
    assert senders.matches("mail-sor-f41.google.com", "203.0.113.1")
    assert senders.matches("unknown", "209.85.220.41")  # Google by network
    assert senders.matches("unknown", "2a01:111:f403:2c14::800")  # Exchange Online IPv6
    assert senders.matches("mail-db8eur05on2101.outbound.protection.outlook.com", "198.51.100.1")
    assert not senders.matches("mx.example.com", "203.0.113.1")
    assert not senders.matches("unknown", "203.0.113.1")
    assert not senders.matches("google.com.evil.test", "203.0.113.1")


def test_large_senders_file_forms(tmp_path: Path) -> None:
    path = tmp_path / "large.txt"
    path.write_text(
        "# comment\n\nmx.exact.test\n.pool.test   # inline comment\n/^out-\\d+\\.bulk\\./\n"
        "198.51.100.0/24\n203.0.113.*\n",
        encoding="utf-8",
    )
    senders = load_large_senders(path)
    assert senders.matches("MX.Exact.Test.", "192.0.2.1")
    assert not senders.matches("a.mx.exact.test", "192.0.2.1")
    assert senders.matches("a.b.pool.test", "192.0.2.1")
    assert not senders.matches("pool.test", "192.0.2.1")
    assert senders.matches("out-17.bulk.example", "192.0.2.1")
    assert senders.matches("unknown", "198.51.100.9")
    assert senders.matches("unknown", "::ffff:203.0.113.200")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("/unclosed", "/pattern/"),
        ("/a(/", "bad regex"),
        ("10.0.0.*.1", "at most four octets"),
        ("someone@example.com", "mailbox"),
        ("bad..name", "empty label"),
    ],
)
def test_a_bad_large_senders_line_names_file_and_line(
    tmp_path: Path, line: str, reason: str
) -> None:
    path = tmp_path / "large.txt"
    path.write_text(f".ok.test\n\n{line}\n", encoding="utf-8")
    with pytest.raises(LargeSendersError) as caught:
        load_large_senders(path)
    assert caught.value.line == 3
    assert str(path) in str(caught.value)
    assert "line 3" in str(caught.value)
    assert reason in str(caught.value)


def test_an_unreadable_large_senders_file_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(LargeSendersError):
        load_large_senders(tmp_path / "missing.txt")


def test_parse_large_senders_of_empty_text_matches_nothing() -> None:
    assert not parse_large_senders("").matches("mail.google.com", "209.85.220.41")


# --- every boundary, on a fake clock -------------------------------------------------------
# Distinct figures so that a boundary computed from the wrong setting shows.
EDGE = GreylistingConfig(
    delay=300, retry_window=1000, expiry=5000, auto_whitelist_after=3, add_header=False
)
PENDING = TripletRecord(T0, T0, 0)  # deferred once at T0, not retried yet
PASSED_AT = T0 + 400.0
PASSED = TripletRecord(T0, PASSED_AT, 1)  # passed at PASSED_AT
RESTART = "restart"  # the attempt is deferred and the delay starts again at that attempt


@pytest.mark.parametrize(
    ("triplet", "now", "rule", "written"),
    [
        # The delay: an attempt before first_seen + delay is early, at it the retry passes.
        (PENDING, T0, Rule.GREYLIST_DEFER, TripletRecord(T0, T0, 0)),
        (PENDING, T0 + 299.999, Rule.GREYLIST_DEFER, TripletRecord(T0, T0 + 299.999, 0)),
        (PENDING, T0 + 300, Rule.GREYLIST_PASS, TripletRecord(T0, T0 + 300, 1)),
        (PENDING, T0 + 300.001, Rule.GREYLIST_PASS, TripletRecord(T0, T0 + 300.001, 1)),
        # The retry window ends delay + retry_window after the first attempt, inclusive.
        (PENDING, T0 + 1299.999, Rule.GREYLIST_PASS, TripletRecord(T0, T0 + 1299.999, 1)),
        (PENDING, T0 + 1300, Rule.GREYLIST_PASS, TripletRecord(T0, T0 + 1300, 1)),
        (PENDING, T0 + 1300.001, Rule.GREYLIST_DEFER, RESTART),
        # An early retry kept the record fresh, but the window still counts from first_seen.
        (TripletRecord(T0, T0 + 299, 0), T0 + 1300.001, Rule.GREYLIST_DEFER, RESTART),
        # A passed triplet: remembered for `expiry` after it was last seen, gone at expiry
        # (when the store's TTL, written with it, runs out).
        (PASSED, PASSED_AT + 4999.999, Rule.GREYLIST_KNOWN, TripletRecord(T0, 0.0, 2)),
        (PASSED, PASSED_AT + 5000, Rule.GREYLIST_DEFER, RESTART),
        (PASSED, PASSED_AT + 5000.001, Rule.GREYLIST_DEFER, RESTART),
        # The retry window no longer applies once a triplet passed.
        (PASSED, T0 + 1300.001, Rule.GREYLIST_KNOWN, TripletRecord(T0, 0.0, 2)),
    ],
)
def test_triplet_boundaries(
    triplet: TripletRecord, now: float, rule: Rule, written: TripletRecord | str
) -> None:
    decision = decide(triplet, None, now, EDGE, exempt=False)
    assert decision.verdict.rule is rule
    if written == RESTART:
        assert decision.triplet_record == TripletRecord(now, now, 0)
    else:
        assert isinstance(written, TripletRecord)
        expected_last_seen = now if written.last_seen == 0.0 else written.last_seen
        assert decision.triplet_record == TripletRecord(
            written.first_seen, expected_last_seen, written.passes
        )


def test_pending_triplet_is_forgotten_at_expiry_even_inside_a_longer_retry_window() -> None:
    # retry_window longer than expiry: the record (and its TTL) is gone first.
    cfg = EDGE.model_copy(update={"retry_window": 10_000})
    early = TripletRecord(T0, T0 + 10, 0)
    assert decide(early, None, T0 + 10 + 4999, cfg, exempt=False).verdict.rule is Rule.GREYLIST_PASS
    forgotten = decide(early, None, T0 + 10 + 5000, cfg, exempt=False)
    assert forgotten.verdict.rule is Rule.GREYLIST_DEFER
    assert forgotten.triplet_record == TripletRecord(T0 + 5010, T0 + 5010, 0)


def test_the_header_counts_the_delay_from_the_first_attempt_at_the_boundary() -> None:
    cfg = EDGE.model_copy(update={"add_header": True})
    decision = decide(PENDING, None, T0 + 300, cfg, exempt=False)
    assert decision.verdict.action is Action.PREPEND
    assert decision.verdict.text.startswith("X-Greylist: delayed 300 seconds by postwarden; ")


@pytest.mark.parametrize(
    ("passes", "age", "rule"),
    [
        # auto_whitelist_after = 3: two passes are not enough, three are.
        (2, 0.0, Rule.GREYLIST_DEFER),
        (3, 0.0, Rule.GREYLIST_KNOWN),
        (4, 0.0, Rule.GREYLIST_KNOWN),
        # The network record is remembered for `expiry` after it was last seen, as a triplet.
        (3, 4999.999, Rule.GREYLIST_KNOWN),
        (3, 5000.0, Rule.GREYLIST_DEFER),
        (3, 5000.001, Rule.GREYLIST_DEFER),
    ],
)
def test_client_network_boundaries(passes: int, age: float, rule: Rule) -> None:
    network = ClientNetworkRecord(passes, T0)
    decision = decide(None, network, T0 + age, EDGE, exempt=False)
    assert decision.verdict.rule is rule


def test_an_expired_network_counts_its_passes_again_from_one() -> None:
    stale = ClientNetworkRecord(50, T0)
    now = T0 + 5000 + 400
    decision = decide(TripletRecord(T0 + 5000, T0 + 5000, 0), stale, now, EDGE, exempt=False)
    assert decision.verdict.rule is Rule.GREYLIST_PASS
    assert decision.network_record == ClientNetworkRecord(1, now)


@pytest.mark.parametrize(
    ("age", "rewritten"),
    [(0.0, False), (NETWORK_TOUCH_INTERVAL - 0.001, False), (NETWORK_TOUCH_INTERVAL, True)],
)
def test_a_whitelisted_network_is_rewritten_once_its_last_seen_is_touch_interval_old(
    age: float, rewritten: bool
) -> None:
    network = ClientNetworkRecord(3, T0)
    decision = decide(None, network, T0 + age, EDGE, exempt=False)
    assert decision.verdict.rule is Rule.GREYLIST_KNOWN
    assert decision.triplet_record is None
    expected = ClientNetworkRecord(3, T0 + age) if rewritten else None
    assert decision.network_record == expected


@pytest.mark.parametrize(
    ("a", "b", "v4", "v6", "same"),
    [
        # The last and first address of neighbouring networks, at each prefix length.
        ("192.0.2.0", "192.0.2.255", 24, 64, True),
        ("192.0.2.255", "192.0.3.0", 24, 64, False),
        ("192.0.2.7", "192.0.2.7", 32, 64, True),
        ("192.0.2.7", "192.0.2.6", 32, 64, False),
        ("10.0.0.0", "10.255.255.255", 8, 64, True),
        ("10.255.255.255", "11.0.0.0", 8, 64, False),
        ("2001:db8::", "2001:db8::ffff:ffff:ffff:ffff", 24, 64, True),
        ("2001:db8::ffff:ffff:ffff:ffff", "2001:db8:0:1::", 24, 64, False),
        ("2001:db8::1", "2001:db8::1", 24, 128, True),
        ("2001:db8::1", "2001:db8::2", 24, 128, False),
        ("2001::", "2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 24, 16, True),
        ("2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2002::", 24, 16, False),
        # IPv4-mapped IPv6 is grouped by the IPv4 prefix, not the IPv6 one.
        ("::ffff:192.0.2.255", "192.0.2.0", 24, 128, True),
        ("::ffff:192.0.2.255", "192.0.3.0", 24, 16, False),
    ],
)
def test_client_network_prefix_boundaries(a: str, b: str, v4: int, v6: int, same: bool) -> None:
    assert (client_network(a, v4, v6) == client_network(b, v4, v6)) is same
