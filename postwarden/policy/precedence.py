"""The pure decision functions: who is outgoing, and what the permitted/forbidden lists say.

No I/O here: the caller hands in the request and the compiled lists and gets a Verdict.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from postwarden.policy.list_entries import CompiledLists, sender_parts
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Rule, Verdict, dunno, reject
from postwarden.syntax.ip_addresses import IPAddress, parse_client_ip
from postwarden.syntax.untrusted_text import sanitise

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A list refusal is permanent: 554 5.7.1, as Postfix's own access(5) REJECT would say.
_REJECT_CODE = 554
_REJECT_ENHANCED = "5.7.1"
_MAX_SHOWN = 200  # longest piece of untrusted input echoed back in a reply


def _shown(value: str) -> str:
    """Untrusted input made safe for an SMTP reply: printable ASCII only, bounded."""
    return sanitise(value, _MAX_SHOWN) + ("..." if len(value) > _MAX_SHOWN else "")


def is_outgoing(request: PolicyRequest, trusted: Sequence[Network]) -> bool:
    """True for SASL-authenticated clients and clients in a trusted network."""
    return is_outgoing_from(request, parse_client_ip(request.client_address), trusted)


def is_outgoing_from(
    request: PolicyRequest, ip: IPAddress | None, trusted: Sequence[Network]
) -> bool:
    """is_outgoing with the client address already parsed (None: not an IP address)."""
    if request.sasl_username:
        return True
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in trusted)


def decide_lists(request: PolicyRequest, lists: CompiledLists) -> Verdict:
    """docs/ARCHITECTURE.md "Precedence", steps A-D; NO_CHECKS when no list decides.

    A pass is DUNNO (never OK): it skips our spam checks but leaves Postfix's own
    restrictions, anti-relay above all, in force, since a sender address is forgeable.
    """
    client = request.client_address
    # A. IP: permitted is only remembered; forbidden refuses at once.
    ip_permitted = lists.permitted.contains_ip(client)
    if not ip_permitted and lists.forbidden.contains_ip(client):
        return _refuse(Rule.IP_FORBIDDEN, f"Client address {_shown(client)} is forbidden")
    mailbox, domain = sender_parts(request.sender)
    # B. mailbox: permitted wins over forbidden.
    if mailbox:
        if lists.permitted.contains_mailbox(mailbox):
            return dunno(Rule.MAILBOX_PERMITTED)
        if lists.forbidden.contains_mailbox(mailbox):
            return _refuse(Rule.MAILBOX_FORBIDDEN, f"Sender <{_shown(mailbox)}> is forbidden")
    # C. domain: a forbidden domain refuses even when the IP was permitted.
    if domain:
        if lists.permitted.contains_domain(domain):
            return dunno(Rule.DOMAIN_PERMITTED)
        if lists.forbidden.contains_domain(domain):
            return _refuse(Rule.DOMAIN_FORBIDDEN, f"Sender domain {_shown(domain)} is forbidden")
    # D. the remembered IP permission.
    if ip_permitted:
        return dunno(Rule.IP_PERMITTED)
    return dunno(Rule.NO_CHECKS)


def _refuse(rule: Rule, text: str) -> Verdict:
    return reject(rule, text, smtp_code=_REJECT_CODE, enhanced_code=_REJECT_ENHANCED)
