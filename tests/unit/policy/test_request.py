"""The policy request as the core sees it (policy/request.py): attributes by name."""

from __future__ import annotations

from postwarden.policy.request import PolicyRequest


def test_attributes_are_read_by_name_and_a_missing_one_is_empty() -> None:
    request = PolicyRequest(
        {"protocol_state": "rcpt", "client_address": "192.0.2.1", "sender": "a@b.example"}
    )
    assert request.protocol_state == "RCPT"  # Postfix's case is not ours to trust
    assert request.client_address == "192.0.2.1"
    assert request.sender == "a@b.example"
    assert request.sasl_username == ""
    assert request.instance == ""
    assert request.get("no_such_attribute") == ""
