"""`postwarden explain`'s text and JSON: one line per lookup that ran, then the reply and rule."""

from __future__ import annotations

from postwarden.policy.dnsbl import DnsblResult
from postwarden.policy.explanation import explanation_json, explanation_lines
from postwarden.policy.filtering_order import (
    Decision,
    DnsblLookup,
    GreylistLookup,
    GreylistRecords,
    RequestFacts,
    Unavailable,
)
from postwarden.policy.pipeline import Explanation
from postwarden.policy.records import TripletRecord
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Rule, defer, dunno

REQUEST = PolicyRequest(
    {
        "protocol_state": "RCPT",
        "client_address": "198.51.100.7",
        "helo_name": "mx.remote.test",
        "sender": "a@remote.test",
        "recipient": "bob@example.test",
    }
)
KEY = "198.51.100.0/24 a@remote.test bob@example.test"


def test_each_lookup_and_what_it_found_then_the_reply() -> None:
    facts = RequestFacts(REQUEST, None, "198.51.100.0/24", KEY)
    explanation = Explanation(
        facts,
        [
            (
                DnsblLookup("198.51.100.7"),
                DnsblResult(score=1, listed=(("zen.test", "127.0.0.2"),)),
            ),
            (
                GreylistLookup(KEY, "198.51.100.0/24"),
                GreylistRecords(TripletRecord(1000.0, 1000.0), None),
            ),
        ],
        Decision(defer(Rule.GREYLIST_DEFER, "Greylisted")),
    )
    reply = "action=DEFER_IF_PERMIT 4.7.1 Greylisted"
    lines = explanation_lines(explanation, 1090.0, reply)
    assert lines[0].startswith("request: RCPT from 198.51.100.7 (unknown), helo mx.remote.test")
    assert lines[1] == f"greylist triplet: {KEY}"
    assert lines[2] == "1. DNSBL 198.51.100.7: score 1, zen.test 127.0.0.2"
    assert lines[3] == f"2. greylist {KEY}: triplet first seen 90 s ago, 0 pass(es)"
    assert lines[4] == f"verdict: {reply} (rule greylist_defer)"
    data = explanation_json(explanation, reply)
    assert [step["lookup"] for step in data["lookups"]] == ["DnsblLookup", "GreylistLookup"]
    assert data["lookups"][0]["answer"]["listed"] == [["zen.test", "127.0.0.2"]]
    assert (data["action"], data["rule"], data["reply"]) == (
        "DEFER_IF_PERMIT",
        "greylist_defer",
        reply,
    )


def test_a_failed_lookup_says_why_the_default_was_answered() -> None:
    failure = Unavailable("store", "database is locked")
    explanation = Explanation(
        RequestFacts(REQUEST, None, "198.51.100.0/24", KEY),
        [(GreylistLookup(KEY, "198.51.100.0/24"), failure)],
        Decision(dunno(Rule.DEFAULT), failure=failure),
    )
    lines = explanation_lines(explanation, 0.0, "action=DUNNO")
    assert "unavailable (store: database is locked)" in lines[2]
    assert lines[3:5] == [
        "verdict: action=DUNNO (rule default)",
        "  because: store: database is locked",
    ]
