"""Verdicts as values: each constructor gives the Postfix action and codes it names."""

from __future__ import annotations

from postwarden.policy.verdict import Action, Rule, defer, dunno, prepend, reject


def test_constructors_carry_action_codes_and_text() -> None:
    assert reject(Rule.DNSBL, "listed", 554) == (
        reject(Rule.DNSBL, "listed", smtp_code=554, enhanced_code="5.7.1")
    )
    refused = reject(Rule.IP_FORBIDDEN, "no")
    assert (refused.action, refused.smtp_code, refused.enhanced_code) == (
        Action.REJECT, 550, "5.7.1",
    )  # fmt: skip
    deferred = defer(Rule.GREYLIST_DEFER, "later")
    assert (deferred.action, deferred.smtp_code, deferred.enhanced_code) == (
        Action.DEFER_IF_PERMIT, None, "4.7.1",
    )  # fmt: skip
    assert prepend(Rule.SPF, "Received-SPF: pass").text == "Received-SPF: pass"
    assert dunno(Rule.TRUSTED).action is Action.DUNNO


def test_only_no_checks_lets_the_next_step_run() -> None:
    assert not dunno(Rule.NO_CHECKS).final
    assert all(dunno(rule).final for rule in Rule if rule is not Rule.NO_CHECKS)
