"""The one label rule for DNS names."""

from __future__ import annotations

import pytest

from postwarden.config.mail import check_domain
from postwarden.policy.list_entries import InvalidEntry, parse_entry
from postwarden.syntax.domain_names import (
    DomainNameError,
    check_labels,
    is_domain_name,
    parse_domain_name,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Example.COM.", "example.com"), ("xn--bcher-kva.de", "xn--bcher-kva.de"), ("a-1.b", "a-1.b")],
)
def test_names_are_lower_cased_without_the_trailing_dot(text: str, expected: str) -> None:
    assert parse_domain_name(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("ex..ample.com", "empty label"),
        ("-bad.example", "not a valid domain label"),
        ("bad-.example", "not a valid domain label"),
        ("a_b.example", "not a valid domain label"),
        ("a" * 64 + ".example", "not a valid domain label"),
        ("bücher.de", "ASCII"),
        ("mx.123", "cannot end in a number"),
        ("10.0.0.1", "cannot end in a number"),
        (("a" * 60 + ".") * 5 + "com", "at most 253"),
    ],
)
def test_refusals_say_why(text: str, reason: str) -> None:
    with pytest.raises(DomainNameError, match=reason):
        parse_domain_name(text)


def test_record_names_may_hold_underscores() -> None:
    assert parse_domain_name("_dmarc.example.com", underscore=True) == "_dmarc.example.com"
    assert not is_domain_name("_dmarc.example.com")


def test_the_label_rule_alone_allows_numeric_selectors() -> None:
    assert check_labels("2024") == ["2024"]


@pytest.mark.parametrize("text", ["mx.123", "a" * 64 + ".example", ("a" * 60 + ".") * 5 + "com"])
def test_config_domains_and_list_domains_refuse_alike(text: str) -> None:
    with pytest.raises(ValueError):
        check_domain(text)
    with pytest.raises(InvalidEntry):
        parse_entry(text)
