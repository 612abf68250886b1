"""Which sender and From: addresses a logged-in user may use (README "Security").

A login (Dovecot's user name, `user@domain`, lower-cased) owns its own address, the aliases
that deliver to it (the `senders` socketmap adds those from the store) and whatever
`mail.sender_grants` gives it: single addresses or whole domains (`@example.org`). Pure
functions: no store, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Grants = Mapping[str, Sequence[str]]


def domain_of(address: str) -> str:
    """The lower-cased domain of `user@domain` ("" when there is none)."""
    _, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at else ""


def is_granted(login: str, address: str, grants: Grants) -> bool:
    """The login itself, or an address or domain that `mail.sender_grants` gives it."""
    login, address = login.lower(), address.lower()
    if address == login:
        return True
    given = grants.get(login, ())
    return address in given or f"@{domain_of(address)}" in given


def owners_by_grant(address: str, grants: Grants) -> list[str]:
    """The logins that `mail.sender_grants` lets send as `address`, in config order."""
    address = address.lower()
    whole_domain = f"@{domain_of(address)}"
    return [login for login, given in grants.items() if address in given or whole_domain in given]


def may_use_from_address(
    login: str, address: str, grants: Grants, envelope_sender: str | None = None
) -> bool:
    """Whether a message from this login may carry `address` in From:.

    Its own address and its grants; or the envelope sender, which Postfix has already bound
    to this login on 587/465 (smtpd_sender_login_maps: identity, grants and the aliases that
    deliver to it), so an alias the user may send from is also a From: they may use."""
    if is_granted(login, address, grants):
        return True
    return envelope_sender is not None and address.lower() == envelope_sender.lower()
