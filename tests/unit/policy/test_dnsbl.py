"""DNSBL scoring without DNS: query names, return-code filters, weights, threshold, refusals."""

from __future__ import annotations

import asyncio

import pytest

from postwarden.config.model import DnsblConfig, DnsblZone
from postwarden.policy.dnsbl import (
    DnsblChecker,
    DnsblError,
    DnsblResult,
    is_refusal,
    matching_codes,
    parse_codes,
    query_label,
    score_answers,
    verdict_for,
)
from postwarden.policy.verdict import Action, Rule


def test_ipv4_is_asked_in_reversed_octets() -> None:
    assert query_label("192.0.2.99") == "99.2.0.192"
    assert query_label("127.0.0.2") == "2.0.0.127"


def test_ipv6_is_asked_in_reversed_nibbles_rfc5782() -> None:
    # RFC 5782 section 2.4's example address.
    assert query_label("2001:db8:1:2:3:4:567:89ab") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
    )
    assert query_label("[2001:db8::2]") == (
        "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
    )


def test_ipv4_mapped_ipv6_is_asked_as_ipv4() -> None:
    assert query_label("::ffff:192.0.2.1") == "1.2.0.192"
    assert query_label("::FFFF:7F00:2") == "2.0.0.127"


def test_non_address_is_a_typed_error() -> None:
    with pytest.raises(DnsblError, match="not an IP address"):
        query_label("unknown")


def test_codes_single_and_ranges() -> None:
    ranges = parse_codes(["127.0.0.2", "127.0.0.4-127.0.0.11"])
    assert matching_codes(["127.0.0.2"], ranges) == ["127.0.0.2"]
    assert matching_codes(["127.0.0.3"], ranges) == []
    assert matching_codes(["127.0.0.4", "127.0.0.11", "127.0.0.12"], ranges) == [
        "127.0.0.4",
        "127.0.0.11",
    ]


def test_empty_codes_mean_any_127_8_answer() -> None:
    ranges = parse_codes([])
    assert matching_codes(["127.0.0.2", "127.1.2.3"], ranges) == ["127.0.0.2", "127.1.2.3"]
    assert matching_codes(["10.0.0.1", "192.0.2.1"], ranges) == []


@pytest.mark.parametrize("code", ["127.255.255.252", "127.255.255.254", "127.255.255.255"])
def test_resolver_refusal_codes_never_match_even_inside_the_filter(code: str) -> None:
    assert is_refusal(code)
    assert matching_codes([code], parse_codes([])) == []
    assert matching_codes([code], parse_codes(["127.0.0.0-127.255.255.255"])) == []


def test_ordinary_codes_are_not_refusals() -> None:
    assert not is_refusal("127.0.0.2")
    assert not is_refusal("127.255.254.1")
    assert not is_refusal("not-an-ip")


def _cfg(*zones: DnsblZone, threshold: int = 3) -> DnsblConfig:
    return DnsblConfig(enabled=True, zones=list(zones), threshold=threshold)


ZEN = DnsblZone(zone="zen.example", weight=2, codes=["127.0.0.2-127.0.0.11"])
PBL = DnsblZone(zone="zen.example", weight=1, codes=["127.0.0.10-127.0.0.11"])
OTHER = DnsblZone(zone="other.example", weight=1)
ALLOW = DnsblZone(zone="allow.example", weight=-5)


def test_weights_of_matching_entries_are_summed() -> None:
    cfg = _cfg(ZEN, OTHER)
    result = score_answers(
        cfg.zones, {"zen.example": ("127.0.0.4",), "other.example": ("127.0.0.2",)}
    )
    assert result.score == 3
    assert result.listed == (("zen.example", "127.0.0.4"), ("other.example", "127.0.0.2"))
    assert result.zones == ("zen.example", "other.example")


def test_an_entry_counts_once_however_many_codes_matched() -> None:
    result = score_answers([ZEN], {"zen.example": ("127.0.0.2", "127.0.0.4")})
    assert result.score == 2


def test_same_zone_in_two_entries_with_different_filters_as_postscreen() -> None:
    assert score_answers([ZEN, PBL], {"zen.example": ("127.0.0.10",)}).score == 3
    assert score_answers([ZEN, PBL], {"zen.example": ("127.0.0.2",)}).score == 2


def test_code_outside_the_filter_does_not_count() -> None:
    result = score_answers([ZEN], {"zen.example": ("127.0.0.20",)})
    assert result == DnsblResult()


def test_nxdomain_and_missing_zones_score_zero() -> None:
    assert score_answers([ZEN, OTHER], {"zen.example": ()}).score == 0


def test_refusal_is_reported_not_counted() -> None:
    result = score_answers([OTHER], {"other.example": ("127.255.255.254",)})
    assert result.score == 0
    assert result.listed == ()
    assert result.errors == ("other.example: resolver refused (127.255.255.254)",)


def test_negative_weight_offsets_a_listing() -> None:
    result = score_answers(
        [ZEN, OTHER, ALLOW],
        {
            "zen.example": ("127.0.0.2",),
            "other.example": ("127.0.0.2",),
            "allow.example": ("127.0.0.2",),
        },
    )
    assert result.score == -2


def test_threshold_reached_rejects_554_naming_the_zones() -> None:
    cfg = _cfg(ZEN, OTHER, threshold=3)
    result = score_answers(
        cfg.zones, {"zen.example": ("127.0.0.3",), "other.example": ("127.0.0.2",)}
    )
    verdict = verdict_for(result, cfg)
    assert verdict is not None
    assert verdict.action is Action.REJECT
    assert verdict.rule is Rule.DNSBL
    assert (verdict.smtp_code, verdict.enhanced_code) == (554, "5.7.1")
    assert verdict.text == "Client host blocked using DNSBL: zen.example, other.example"


def test_below_threshold_has_no_opinion() -> None:
    cfg = _cfg(ZEN, OTHER, threshold=3)
    result = score_answers(cfg.zones, {"zen.example": ("127.0.0.3",)})
    assert result.score == 2
    assert verdict_for(result, cfg) is None
    assert verdict_for(DnsblResult(), cfg) is None


def test_timeouts_are_not_listings() -> None:
    cfg = _cfg(ZEN, threshold=1)
    result = score_answers(cfg.zones, {}, timed_out=["zen.example"])
    assert result.timed_out == ("zen.example",)
    assert verdict_for(result, cfg) is None


def test_ranges_parsed_once_by_the_caller_score_like_the_zone_filters() -> None:
    answers = {"zen.example": ("127.0.0.10",), "other.example": ("127.0.0.2",)}
    entries = [ZEN, PBL, OTHER]
    ranges = [parse_codes(e.codes) for e in entries]
    assert score_answers(entries, answers, ranges=ranges) == score_answers(entries, answers)
    # The given ranges are the ones applied: an empty filter matches nothing.
    assert score_answers(entries, answers, ranges=[(), (), ()]).score == 0


# --- the 127.0.0.1 probe, on a resolver that the test scripts --------------------------------


class _Rdata:
    def __init__(self, address: str) -> None:
        self.address = address


class _RRset(list[_Rdata]):
    ttl = 60


class _Answer:
    """What dnspython's resolve() returns, as far as the checker reads it."""

    def __init__(self, codes: tuple[str, ...]) -> None:
        self.rrset = _RRset(_Rdata(c) for c in codes) if codes else None


class ScriptedResolver:
    """Answers each query name from `answers`; a name in `hang` is never answered."""

    def __init__(
        self, answers: dict[str, tuple[str, ...]], hang: frozenset[str] = frozenset()
    ) -> None:
        self.answers = answers
        self.hang = hang
        self.asked: list[str] = []

    async def resolve(
        self, qname: str, rdtype: str, *, lifetime: float, raise_on_no_answer: bool
    ) -> _Answer:
        self.asked.append(qname)
        if qname in self.hang:
            await asyncio.sleep(3600)  # a resolver that ignores its lifetime
        return _Answer(self.answers.get(qname, ()))


def _scripted(resolver: ScriptedResolver, budget: float = 0.2) -> DnsblChecker:
    cfg = DnsblConfig(enabled=True, zones=[DnsblZone(zone="bl.example")], budget=budget)
    return DnsblChecker(cfg, resolver, clock=lambda: 1000.0)  # type: ignore[arg-type]


async def test_an_unanswered_probe_ends_with_the_request_that_started_it() -> None:
    resolver = ScriptedResolver(
        {"2.2.0.192.bl.example.": ("127.0.0.2",)}, hang=frozenset({"1.0.0.127.bl.example."})
    )
    checker = _scripted(resolver)
    result = await asyncio.wait_for(checker.check("192.0.2.2"), 5.0)  # a bound, not a timing
    # The client's answer counts: a probe that got no answer says nothing about the list.
    assert (result.score, result.disabled) == (1, ())
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftover == []
    # Not asked again on the next request: the unanswered probe counts as a probe.
    await checker.check("192.0.2.2")
    assert resolver.asked.count("1.0.0.127.bl.example.") == 1


async def test_a_probe_answer_in_the_same_batch_decides_for_that_request() -> None:
    resolver = ScriptedResolver(
        {"1.0.0.127.bl.example.": ("127.0.0.4",), "2.2.0.192.bl.example.": ("127.0.0.4",)}
    )
    checker = _scripted(resolver)
    result = await checker.check("192.0.2.2")
    assert (result.score, result.listed, result.disabled) == (0, (), ("bl.example",))
