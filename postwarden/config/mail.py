"""Mail-system settings rendered into Postfix and Dovecot (domains, ports, TLS, relays, …)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class MailConfig(BaseModel):
    """Domains and identity of the gateway. (Extended by the appliance work.)"""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hostname: str = "localhost"
    main_domain: str = "localhost"
    additional_domains: list[str] = []
