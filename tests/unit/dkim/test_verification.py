"""Which sender-controlled DKIM tags may stand unquoted in Authentication-Results."""

from __future__ import annotations

import pytest

from postwarden.dkim.verification import _property


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("header.d", "example.com"),
        ("header.d", "Mail.Example.COM"),
        ("header.s", "s_2024.keys"),
        ("header.s", "2024"),
        ("header.i", "@example.com"),
        ("header.i", "j.smith+tag@example.com"),
        ("header.a", "rsa-sha256"),
    ],
)
def test_a_well_formed_tag_is_kept(name: str, value: str) -> None:
    assert _property(name, value) == f"{name}={value}"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("header.d", "example.com; dkim=pass"),
        ("header.d", "exa mple.com"),
        ("header.d", "example.com."),
        ("header.d", "a..b"),
        ("header.d", "x" * 64 + ".com"),
        ("header.s", "s1\r\nX-Evil: 1"),
        ("header.i", "no-at-sign.example"),
        ("header.i", "a(b)@example.com"),
        ("header.i", "a@exa mple.com"),
        ("header.a", "RSA SHA256"),
        ("header.d", ""),
    ],
)
def test_a_tag_of_any_other_shape_is_left_out(name: str, value: str) -> None:
    assert _property(name, value) is None
