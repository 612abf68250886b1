"""An explanation (`Pipeline.explain`) as the lines and JSON `postwarden explain` prints.

Pure: the explanation and the clock in, text out. Each step of the filtering order
(docs/ARCHITECTURE.md, "Filtering order") that ran is one line: what was asked, what was
found; the last line is the reply as Postfix would get it, with its rule, the same rule
policyd logs for that request.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from postwarden.policy.dnsbl import DnsblResult
from postwarden.policy.filtering_order import (
    DnsblLookup,
    GreylistLookup,
    GreylistRecords,
    SpfLookup,
    Unavailable,
)
from postwarden.policy.pipeline import Explanation
from postwarden.policy.spf_check import SpfResult


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _found(answer: object, now: float) -> str:
    if isinstance(answer, Unavailable):
        return f"unavailable ({answer.kind}: {answer.reason})"
    if isinstance(answer, DnsblResult):
        listed = ", ".join(f"{zone} {code}" for zone, code in answer.listed) or "not listed"
        extra = [f"timed out: {', '.join(answer.timed_out)}"] if answer.timed_out else []
        extra += [f"errors: {'; '.join(answer.errors)}"] if answer.errors else []
        return "; ".join([f"score {answer.score}, {listed}", *extra])
    if isinstance(answer, SpfResult):
        return f"{answer.result} ({answer.explanation})" if answer.explanation else answer.result
    if isinstance(answer, GreylistRecords):
        triplet = answer.triplet
        parts = [
            "triplet new"
            if triplet is None
            else f"triplet first seen {_age(now - triplet.first_seen)} ago, "
            f"{triplet.passes} pass(es)"
        ]
        if answer.network is not None:
            parts.append(f"client network passed {answer.network.passes} time(s)")
        return ", ".join(parts)
    return repr(answer)


def _asked(lookup: object) -> str:
    if isinstance(lookup, DnsblLookup):
        return f"DNSBL {lookup.client_address}"
    if isinstance(lookup, SpfLookup):
        return f"SPF for <{lookup.sender}> from {lookup.client_address} (helo {lookup.helo})"
    if isinstance(lookup, GreylistLookup):
        return f"greylist {lookup.triplet_key}"
    return repr(lookup)


def explanation_lines(explanation: Explanation, now: float, reply: str) -> list[str]:
    """One line per step that ran, then the verdict and its rule.

    `reply` is the verdict as policyd encodes it for Postfix (`action=…`)."""
    facts = explanation.facts
    request = facts.request
    lines = [
        f"request: {request.protocol_state} from {request.client_address or '-'} "
        f"({request.client_name or 'unknown'}), helo {request.helo_name or '-'}, "
        f"from <{request.sender}> to <{request.recipient}>"
        + (f", logged in as {request.sasl_username}" if request.sasl_username else "")
    ]
    if facts.decided is not None:
        lines.append(f"decided before any lookup: rule {facts.decided.verdict.rule.value}")
    elif facts.client_network is not None:
        large = ", a large sender (not greylisted)" if facts.large_sender else ""
        lines.append(f"greylist triplet: {facts.triplet_key}{large}")
    for number, (lookup, answer) in enumerate(explanation.lookups, 1):
        lines.append(f"{number}. {_asked(lookup)}: {_found(answer, now)}")
    decision = explanation.decision
    lines.append(f"verdict: {reply} (rule {decision.verdict.rule.value})")
    if decision.failure is not None:
        lines.append(f"  because: {decision.failure.kind}: {decision.failure.reason}")
    lines.append("nothing was written: policyd's next answer is unchanged")
    return lines


def _plain(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def explanation_json(explanation: Explanation, reply: str) -> dict[str, Any]:
    """The same explanation as data: each lookup's kind and fields, answers, the verdict."""
    decision = explanation.decision
    return {
        "request": dict(explanation.facts.request.attributes),
        "decided_before_lookups": explanation.facts.decided is not None,
        "triplet": explanation.facts.triplet_key or None,
        "large_sender": explanation.facts.large_sender,
        "lookups": [
            {"lookup": type(lookup).__name__, **_plain(lookup), "answer": _plain(answer)}
            for lookup, answer in explanation.lookups
        ],
        "reply": reply,
        "action": decision.verdict.action.value,
        "rule": decision.verdict.rule.value,
        "failure": _plain(decision.failure),
    }
