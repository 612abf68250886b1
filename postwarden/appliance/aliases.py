"""Forwarding aliases: what `postwarden aliases add` accepts and how a rule is described.

The seed's four kinds of forwarding are all one rule shape, address -> targets, which
Postfix applies as a virtual alias (served live from the store by policyd's socketmap):

| rule                                  | kind      | effect                                   |
| ------------------------------------- | --------- | ---------------------------------------- |
| manager -> r.johnson                  | alias     | mail for manager goes to r.johnson       |
| sales -> j.smith r.johnson            | group     | each member gets a copy                  |
| r.johnson -> j.smith r.johnson        | copy      | the mailbox keeps its mail AND forwards  |
| ceo -> ceo@gmail.com                  | external  | forwarded off the server                 |

A bare local part means the main domain. Postfix stops expanding an address that maps to
itself, which is what makes the "copy" kind keep its own mail.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from postwarden.syntax.domain_names import DomainNameError, parse_domain_name

# Postfix's virtual_alias_expansion_limit default is 1000 addresses per message.
MAX_TARGETS = 1000
# RFC 5321: local part 64, whole path 254 octets.
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254

_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]+$")

AliasKind = Literal["alias", "group", "copy", "external"]


class AliasError(ValueError):
    """A forwarding rule that cannot be stored; the message says what is wrong."""


def normalize_address(text: str, main_domain: str) -> str:
    """A lower-cased `local@domain`; a bare local part gets the main domain."""
    value = text.strip().lower()
    if "@" not in value:
        value = f"{value}@{main_domain.lower()}"
    local, _, domain = value.rpartition("@")
    if not local or not _LOCAL_RE.match(local) or local.startswith(".") or ".." in local:
        raise AliasError(f"{text!r} is not a mail address (local part {local!r})")
    if len(local) > MAX_LOCAL_PART or len(value) > MAX_ADDRESS:
        raise AliasError(f"{text!r} is too long for a mail address")
    if not _is_plain_domain(domain):
        raise AliasError(f"{text!r} is not a mail address (domain {domain!r})")
    return value


def _is_plain_domain(domain: str) -> bool:
    """The one domain-name rule (postwarden.syntax.domain_names), spelled exactly as stored."""
    try:
        return parse_domain_name(domain) == domain
    except DomainNameError:
        return False


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


@dataclass(frozen=True, slots=True)
class AliasRule:
    """One forwarding rule, normalised: `address` forwards to `targets` (in order, no repeats)."""

    address: str
    targets: tuple[str, ...]

    def kind(self, local_domains: Iterable[str]) -> AliasKind:
        """Which of the seed's forwarding kinds this rule is."""
        local = {d.lower() for d in local_domains}
        if any(domain_of(t) not in local for t in self.targets):
            return "external"
        if self.address in self.targets:
            return "copy"
        return "alias" if len(self.targets) == 1 else "group"


def make_rule(
    address: str,
    targets: Sequence[str],
    *,
    main_domain: str,
    local_domains: Iterable[str],
) -> AliasRule:
    """Validate and normalise one rule; AliasError says what is wrong."""
    local = {d.lower() for d in local_domains} | {main_domain.lower()}
    addr = normalize_address(address, main_domain)
    if domain_of(addr) not in local:
        # A virtual alias applies to every recipient, so an outside address here would
        # silently redirect our users' outgoing mail.
        raise AliasError(
            f"{addr!r}: only addresses in our own domains can forward "
            f"(local domains: {', '.join(sorted(local))})"
        )
    if not targets:
        raise AliasError(f"{addr!r}: give at least one target address")
    if len(targets) > MAX_TARGETS:
        raise AliasError(f"{addr!r}: {len(targets)} targets; at most {MAX_TARGETS}")
    normalised: list[str] = []
    for target in targets:
        value = normalize_address(target, main_domain)
        if value not in normalised:
            normalised.append(value)
    if normalised == [addr]:
        raise AliasError(f"{addr!r} forwards only to itself; that rule would do nothing")
    return AliasRule(addr, tuple(normalised))


def find_loop(existing: Mapping[str, Sequence[str]], rule: AliasRule) -> list[str] | None:
    """A forwarding cycle the new rule would close (a -> b -> a), or None.

    An address that lists itself (the "copy" kind) is not a loop: Postfix delivers it.
    Depth-first with an explicit stack: a chain of thousands of aliases is no recursion.
    """
    aliases = {**existing, rule.address: list(rule.targets)}
    path: list[str] = [rule.address]
    on_path: set[str] = {rule.address}
    done: set[str] = set()
    # Per address on the path, the targets still to visit.
    pending: list[Iterator[str]] = [iter(aliases[rule.address])]
    while pending:
        target = next(pending[-1], None)
        if target is None:
            finished = path.pop()
            on_path.discard(finished)
            done.add(finished)
            pending.pop()
            continue
        if target == path[-1] or target in done or target not in aliases:
            continue
        if target in on_path:
            return [*path[path.index(target) :], target]
        path.append(target)
        on_path.add(target)
        pending.append(iter(aliases[target]))
    return None


def describe(rule: AliasRule, local_domains: Iterable[str]) -> str:
    """One line for `aliases show`: `sales@example.com -> a@x, b@y  (group)`."""
    return f"{rule.address} -> {', '.join(rule.targets)}  ({rule.kind(local_domains)})"
