"""Verdicts: what postwarden decided about one request, as a value.

A verdict carries the Postfix action, the SMTP codes, the human text and the rule that
fired. Adapters turn it into bytes (`policyd.policy_codec.encode_verdict`); nothing else
builds `action=` strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    """Postfix access(5) actions that policyd answers with."""

    DUNNO = "DUNNO"  # no opinion: Postfix goes on with its own restrictions
    REJECT = "REJECT"  # permanent refusal (5xx)
    DEFER_IF_PERMIT = "DEFER_IF_PERMIT"  # temporary refusal unless a later check rejects
    PREPEND = "PREPEND"  # no opinion, but add a header to the message


class Rule(StrEnum):
    """Which step of the filtering order produced the verdict (a bounded metrics label)."""

    TRUSTED = "trusted"  # SASL-authenticated or trusted network: outgoing, not filtered
    IP_FORBIDDEN = "ip_forbidden"
    MAILBOX_PERMITTED = "mailbox_permitted"
    MAILBOX_FORBIDDEN = "mailbox_forbidden"
    DOMAIN_PERMITTED = "domain_permitted"
    DOMAIN_FORBIDDEN = "domain_forbidden"
    IP_PERMITTED = "ip_permitted"
    DNSBL = "dnsbl"
    SPF_FAIL = "spf_fail"
    SPF = "spf"  # SPF evaluated, not refused: Received-SPF added
    GREYLIST_DEFER = "greylist_defer"
    GREYLIST_PASS = "greylist_pass"  # noqa: S105 -- a rule name, not a password
    GREYLIST_KNOWN = "greylist_known"  # triplet or client network already known good
    GREYLIST_EXEMPT = "greylist_exempt"  # large-sender list
    NO_CHECKS = "no_checks"  # nothing enabled objected
    NOT_APPLICABLE = "not_applicable"  # not a stage we judge (e.g. request at CONNECT)
    DEFAULT = "default"  # internal error or unreachable store/DNS: configured safe default
    BAD_REQUEST = "bad_request"


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule: Rule
    smtp_code: int | None = None  # e.g. 550; None lets Postfix choose
    enhanced_code: str | None = None  # e.g. "5.7.1"
    text: str = ""  # human text for REJECT/DEFER, or the whole header line for PREPEND

    @property
    def final(self) -> bool:
        """True when later filtering steps must not run (a refusal or a pass)."""
        return self.rule is not Rule.NO_CHECKS


def dunno(rule: Rule) -> Verdict:
    return Verdict(Action.DUNNO, rule)


def reject(rule: Rule, text: str, smtp_code: int = 550, enhanced_code: str = "5.7.1") -> Verdict:
    return Verdict(Action.REJECT, rule, smtp_code, enhanced_code, text)


def defer(rule: Rule, text: str, enhanced_code: str = "4.7.1") -> Verdict:
    return Verdict(Action.DEFER_IF_PERMIT, rule, None, enhanced_code, text)


def prepend(rule: Rule, header_line: str) -> Verdict:
    return Verdict(Action.PREPEND, rule, None, None, header_line)
