"""The filtering order of one policy request, pure (docs/ARCHITECTURE.md, "Filtering order").

Sans-IO, in two pure functions: `request_facts()` derives once what the request and the
compiled lists alone say (the stage, outgoing or not, the list verdict, the greylist
triplet); `next_step()` is given those facts, the settings, what has been gathered so far
and the time, and answers either the next lookup the order reaches (`DnsblLookup`,
`SpfLookup`, `GreylistLookup`) or the final `Decision`: the verdict and the state to
write. The caller (`postwarden.policy.pipeline.Pipeline`) makes the lookup, adds its
answer to `Gathered` and asks again. A lookup is asked for only once the order reaches
it, so a permitted sender costs no DNS query and no store access.

A lookup that failed (store or DNS) is gathered as `Unavailable`; what it means (the
configured default, rule `default`) is decided here like any other answer. Nothing here
awaits, reads a clock, or touches the store or DNS.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import NamedTuple

from postwarden.config.model import Config, DnsblConfig, GreylistingConfig, SpfConfig
from postwarden.policy import dnsbl, greylisting, precedence, spf_check
from postwarden.policy.greylisting import LargeSenders
from postwarden.policy.list_entries import CompiledLists
from postwarden.policy.precedence import Network
from postwarden.policy.records import ClientNetworkRecord, TripletRecord
from postwarden.policy.request import PolicyRequest
from postwarden.policy.verdict import Action, Rule, Verdict, dunno, prepend
from postwarden.syntax.ip_addresses import parse_client_ip

# -- what the order is given ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FilteringSettings:
    """What the order needs of the config: which steps run, their knobs, the safe default."""

    trusted: tuple[Network, ...]
    default: Verdict  # answered when a lookup or the whole request failed
    dnsbl: DnsblConfig | None = None  # None: the step is off
    spf: SpfConfig | None = None
    greylisting: GreylistingConfig | None = None
    large_senders: LargeSenders | None = None  # exempt from greylisting

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        dnsbl: bool = True,
        spf: bool = True,
        large_senders: LargeSenders | None = None,
    ) -> FilteringSettings:
        """The settings of `cfg`; `dnsbl`/`spf` False turn a step off (no checker to ask)."""
        return cls(
            trusted=tuple(cfg.network.trusted),
            default=Verdict(Action(cfg.policyd.default_action), Rule.DEFAULT),
            dnsbl=cfg.dnsbl if dnsbl and cfg.dnsbl.enabled else None,
            spf=cfg.spf if spf and cfg.spf.enabled else None,
            greylisting=cfg.greylisting if cfg.greylisting.enabled else None,
            large_senders=large_senders,
        )


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A lookup (or the whole request) that failed; gathered in place of its answer."""

    kind: str  # "store", "dns"; for the whole request also "timeout", "unexpected"
    reason: str


class GreylistRecords(NamedTuple):  # a NamedTuple for speed, as the answers below
    """The store's greylist state for one triplet and its client network (None: unknown)."""

    triplet: TripletRecord | None = None
    network: ClientNetworkRecord | None = None


@dataclass(slots=True)
class Gathered:
    """What the caller has gathered for one request so far (None: not asked yet).

    The caller fills it in as answers arrive; the order only reads it.
    """

    dnsbl: dnsbl.DnsblResult | Unavailable | None = None
    spf: spf_check.SpfResult | Unavailable | None = None
    greylist: GreylistRecords | Unavailable | None = None
    greylist_write: Unavailable | None = None  # set when writing the decision's records failed
    # Names (lower case) of the headers already prepended to this message for an earlier
    # recipient: every recipient is its own request with the same `instance`.
    sent_headers: Set[str] = frozenset()


# -- what the order answers ----------------------------------------------------------------
# NamedTuples, not frozen dataclasses: several are built for every request, and a frozen
# dataclass takes about twice as long to build (bench/policy_bench.py counts microseconds).


class DnsblLookup(NamedTuple):
    """Score the client at the DNSBLs."""

    client_address: str


class SpfLookup(NamedTuple):
    """Evaluate SPF for MAIL FROM `sender` (or postmaster@helo) from the client."""

    client_address: str
    sender: str
    helo: str


class GreylistLookup(NamedTuple):
    """Read the triplet's and the client network's greylist records from the store."""

    triplet_key: str
    client_network: str


Lookup = DnsblLookup | SpfLookup | GreylistLookup


class GreylistWrite(NamedTuple):
    """Greylist records to store (None: leave that record as it is)."""

    triplet_key: str
    triplet: TripletRecord | None
    client_network: str
    network: ClientNetworkRecord | None
    ttl: float


class Decision(NamedTuple):
    """The final answer to one request and the state the caller must write."""

    verdict: Verdict
    greylist_write: GreylistWrite | None = None
    # Header name to remember as prepended for this message (None: nothing to remember).
    remember_header: str | None = None
    failure: Unavailable | None = None  # why the default was answered: to log and count


Step = Lookup | Decision


class RequestFacts(NamedTuple):
    """What the request and the lists alone say, derived once per request."""

    request: PolicyRequest
    # Not judged, outgoing, or decided by a list: the final verdict, no lookup needed.
    decided: Decision | None
    # The greylist triplet; client_network None: greylisting off, or no IP to group by.
    client_network: str | None = None
    triplet_key: str = ""
    large_sender: bool = False  # exempt from greylisting


_NOT_APPLICABLE = Decision(dunno(Rule.NOT_APPLICABLE))
_TRUSTED = Decision(dunno(Rule.TRUSTED))
# No client address to group by: nothing to greylist.
_NO_ADDRESS = Decision(dunno(Rule.NO_CHECKS))


def failed(settings: FilteringSettings, failure: Unavailable) -> Decision:
    """The answer when the store or DNS failed: the configured default, never a refusal."""
    return Decision(settings.default, failure=failure)


def header_name(header_line: str) -> str:
    """`Received-SPF: pass ...` -> `received-spf`: how sent headers are remembered."""
    return header_line.partition(":")[0].strip().lower()


def request_facts(
    request: PolicyRequest, lists: CompiledLists, settings: FilteringSettings
) -> RequestFacts:
    """Steps 1-3 of the order (stage, outgoing, lists) and the greylist triplet."""
    if request.protocol_state != "RCPT":
        return RequestFacts(request, _NOT_APPLICABLE)
    ip = parse_client_ip(request.client_address)  # once: every step below needs it
    if precedence.is_outgoing_from(request, ip, settings.trusted):
        return RequestFacts(request, _TRUSTED)
    listed = precedence.decide_lists(request, lists)
    if listed.final:
        return RequestFacts(request, Decision(listed))
    gcfg = settings.greylisting
    if gcfg is None:
        return RequestFacts(request, None)
    if ip is None:
        return RequestFacts(request, None)
    network = greylisting.client_network(ip, gcfg.ipv4_prefix, gcfg.ipv6_prefix)
    key = greylisting.triplet_key(
        network, greylisting.normalise_sender(request.sender), request.recipient.lower()
    )
    large = settings.large_senders is not None and settings.large_senders.matches(
        request.client_name, request.client_address
    )
    return RequestFacts(request, None, network, key, large)


def next_step(
    facts: RequestFacts, settings: FilteringSettings, gathered: Gathered, now: float
) -> Step:
    """The next lookup the filtering order needs, or the final Decision once it has all."""
    if facts.decided is not None:
        return facts.decided
    request = facts.request
    rule = Rule.NO_CHECKS
    # Postfix takes one action per reply: every PREPEND found is collected, and the first
    # one not yet sent for this message is answered (Received-SPF before X-Greylist).
    headers: list[Verdict] = []

    if settings.dnsbl is not None:
        answer = gathered.dnsbl
        if answer is None:
            return DnsblLookup(request.client_address)
        if isinstance(answer, Unavailable):
            return failed(settings, answer)
        found = dnsbl.verdict_for(answer, settings.dnsbl)
        if found is not None:
            return Decision(found)  # a listing refuses; below the threshold it says nothing

    if settings.spf is not None:
        spf_answer = gathered.spf
        if spf_answer is None:
            return SpfLookup(request.client_address, request.sender, request.helo_name)
        if isinstance(spf_answer, Unavailable):
            return failed(settings, spf_answer)
        found = spf_check.verdict_for(spf_answer, settings.spf)
        if found is not None:
            if found.action is not Action.PREPEND:
                return Decision(found)  # a fail with fail_action = reject
            headers.append(found)
            rule = found.rule

    write: GreylistWrite | None = None
    if settings.greylisting is not None:
        step = _greylist(facts, settings, settings.greylisting, gathered, now)
        if isinstance(step, GreylistLookup) or step.failure is not None:
            return step
        found, write = step.verdict, step.greylist_write
        if found.action is Action.PREPEND:
            headers.append(found)
        elif found.action is not Action.DUNNO:
            return Decision(found, write)  # deferred
        rule = found.rule

    for header in headers:
        name = header_name(header.text)
        if name not in gathered.sent_headers:
            # Without an instance the recipients of a message cannot be told apart.
            remember = name if request.instance else None
            return Decision(prepend(rule, header.text), write, remember)
    return Decision(dunno(rule), write)


def _greylist(
    facts: RequestFacts,
    settings: FilteringSettings,
    gcfg: GreylistingConfig,
    gathered: Gathered,
    now: float,
) -> GreylistLookup | Decision:
    """Greylisting's verdict and records to write, or the lookup/failure that comes first."""
    network = facts.client_network
    if network is None:
        return _NO_ADDRESS
    records = gathered.greylist
    if records is None:
        # Asked for even when the client is a large sender (which needs no record), as
        # policyd always did: a store outage then answers the default for those too.
        return GreylistLookup(facts.triplet_key, network)
    if isinstance(records, Unavailable):
        return failed(settings, records)
    decision = greylisting.decide(
        records.triplet, records.network, now, gcfg, exempt=facts.large_sender
    )
    if decision.triplet_record is None and decision.network_record is None:
        return Decision(decision.verdict)
    if gathered.greylist_write is not None:
        return failed(settings, gathered.greylist_write)
    write = GreylistWrite(
        facts.triplet_key, decision.triplet_record, network, decision.network_record, gcfg.expiry
    )
    return Decision(decision.verdict, write)
