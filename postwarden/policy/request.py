"""The policy request as the core sees it: Postfix's attributes, already decoded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """One Postfix policy delegation request (SMTPD_POLICY_README), attributes by name."""

    attributes: Mapping[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str:
        return self.attributes.get(name, "")

    @property
    def protocol_state(self) -> str:
        return self.get("protocol_state").upper()

    @property
    def client_address(self) -> str:
        return self.get("client_address")

    @property
    def client_name(self) -> str:
        return self.get("client_name")

    @property
    def reverse_client_name(self) -> str:
        return self.get("reverse_client_name")

    @property
    def sender(self) -> str:
        return self.get("sender")

    @property
    def recipient(self) -> str:
        return self.get("recipient")

    @property
    def sasl_username(self) -> str:
        return self.get("sasl_username")

    @property
    def queue_id(self) -> str:
        return self.get("queue_id")

    @property
    def instance(self) -> str:
        return self.get("instance")

    @property
    def helo_name(self) -> str:
        return self.get("helo_name")
