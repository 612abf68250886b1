"""Which sender addresses and From: domains a logged-in user may use (README "Security").

A login (Dovecot's user name, `user@domain`, lower-cased) owns its own address, the aliases
that deliver to it (the `senders` socketmap adds those from the store) and whatever
`mail.sender_grants` gives it: single addresses or whole domains (`@example.org`). Pure
functions: no store, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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


def from_domains(login: str, grants: Grants, aliases: Iterable[str] = ()) -> set[str]:
    """Domains the login may put in From: its own, its granted ones, its aliases' domains."""
    login = login.lower()
    given = [g.lstrip("@") if g.startswith("@") else domain_of(g) for g in grants.get(login, ())]
    return {domain_of(login), *given, *(domain_of(a) for a in aliases)} - {""}


def may_use_from_domain(login: str, domain: str, grants: Grants) -> bool:
    """Whether a message from this login may carry a From: address in `domain`."""
    return domain.lower().rstrip(".") in from_domains(login, grants)
