"""Gateway mode (`[gateway]`): postwarden in front of an existing mail server, the backend.

The backend's domains are relayed to it, never delivered here; IMAP and POP3 logins are
passed through to it and SMTP logins are checked against it, so the gateway holds no
password of anyone's. Each backend service is reached with one of three securities:
enforced STARTTLS (the default: the connection fails when the backend does not offer or
acknowledge STARTTLS), TLS from the first byte, or unencrypted (tests only; `config check`
warns). With TLS, the backend's certificate must chain to `gateway.ca` and name
`gateway.certificate_name` (default: the service's host).

Contract: docs/gateway-mode.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from postwarden.config.mail import Domain, Port, _Table, check_host
from postwarden.syntax.networks import NetworkSyntaxError, parse_ip_address

Security = Literal["starttls", "tls", "none"]
ServiceName = Literal["smtp", "imap", "pop3"]

# The seed's defaults per service and security: SMTP 587 STARTTLS / 465 TLS / 25 plain,
# IMAP 143 / 993 / 143, POP3 110 / 995 / 110.
DEFAULT_PORTS: dict[ServiceName, dict[Security, int]] = {
    "smtp": {"starttls": 587, "tls": 465, "none": 25},
    "imap": {"starttls": 143, "tls": 993, "none": 143},
    "pop3": {"starttls": 110, "tls": 995, "none": 110},
}


class BackendService(_Table):
    """One service of the backend: where it is and how it is reached."""

    host: str
    port: Port | None = None
    security: Security = "starttls"

    @model_validator(mode="before")
    @classmethod
    def _host_checked(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("host"), str):
            data = {**data, "host": check_host(data["host"])}
        return data

    @property
    def host_is_address(self) -> bool:
        """The host is an IP address (check_host spells one normally), not a name."""
        try:
            parse_ip_address(self.host)
        except NetworkSyntaxError:
            return False
        return True


class GatewayConfig(_Table):
    """`[gateway]`: off unless enabled; then smtp and at least the domains are required."""

    enabled: bool = False
    # The backend's mail domains: inbound mail to them is filtered and relayed to the
    # backend; a domain here cannot also be one of ours (mail.main_domain and
    # mail.additional_domains).
    domains: list[Domain] = Field(default_factory=list)
    smtp: BackendService | None = None
    # IMAP logins are passed through to it, and SMTP logins are checked by one login
    # there. Unset: both are refused for the backend's domains (an inbound-only gateway).
    imap: BackendService | None = None
    # Unset: POP3 logins to the backend's domains are refused.
    pop3: BackendService | None = None
    # PEM file of the CA the backend's certificates must chain to (required with TLS).
    ca: Path | None = None
    # The name the backend's certificates must carry; unset: each service's host.
    certificate_name: Domain | None = None
    # A client certificate (and key) the gateway presents to the backend's SMTP, so that
    # the backend can trust the gateway's hop by certificate rather than by address.
    client_cert: Path | None = None
    client_key: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> GatewayConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("gateway.client_cert and gateway.client_key are set together")
        if not self.enabled:
            return self
        if not self.domains:
            raise ValueError("gateway.enabled = true needs gateway.domains (the backend's domains)")
        if self.smtp is None:
            raise ValueError("gateway.enabled = true needs [gateway.smtp] (the backend's SMTP)")
        encrypted = [name for name, service in self.services() if service.security != "none"]
        if encrypted and self.ca is None:
            raise ValueError(
                f"gateway.ca is required: {', '.join(encrypted)} use TLS, and the backend's "
                "certificate must chain to a CA named here"
            )
        return self

    def services(self) -> list[tuple[ServiceName, BackendService]]:
        """The configured backend services, in the order smtp, imap, pop3."""
        named: list[tuple[ServiceName, BackendService | None]] = [
            ("smtp", self.smtp),
            ("imap", self.imap),
            ("pop3", self.pop3),
        ]
        return [(name, service) for name, service in named if service is not None]

    def port(self, name: ServiceName) -> int:
        """The backend port of a configured service: as set, or the seed's default."""
        service = dict(self.services())[name]
        return service.port if service.port is not None else DEFAULT_PORTS[name][service.security]

    def certificate_name_for(self, name: ServiceName) -> str:
        """The name the backend's certificate must carry for this service."""
        return self.certificate_name or dict(self.services())[name].host
