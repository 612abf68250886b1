"""The tally: what the sender saw joined with what Dovecot stored and Postfix still holds.

Pure: `tally()` takes the outcomes and the three views of where each token ended up and
returns the counts; `render_table()` prints them. Definitions (per message, by token):

- sent: every planned message; accepted: 250 after DATA at least once;
- delivered: found in a mailbox (as itself, not inside a bounce notice);
- duplicated: delivered more than once (`copies` counts the extra copies);
- queued: still in Postfix's queue at the end (after the drain);
- bounced: refused with 5xx at the sender, or named by a bounce notice (delivered or queued);
- lost: accepted but neither delivered, queued nor bounced;
- unsigned: an outbound (submitted) message delivered without a valid DKIM signature of ours;
- unchecked: a message from a forbidden sender (list entry by IP, mailbox or domain) that was
  accepted or delivered;
- gave_up: the sender's retries ran out (never accepted: the sender still holds it). Not
  one by design: a forbidden or DNSBL-listed sender is refused with a 5xx ("bounced",
  "refused"); only mail the gateway kept deferring for 40 attempts or 15 minutes gives up.

`Tally.failures()` names the counts that fail a run: lost, duplicated and unchecked always,
gave up when the caller counts it (`--gave-up-fails`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from bench.chaos.sender import Outcome

COUNT_NAMES = (
    "sent",
    "accepted",
    "delivered",
    "queued",
    "bounced",
    "lost",
    "duplicated",
    "unsigned",
    "unchecked",
    "refused",
    "gave_up",
    "ambiguous",
    "delivered_unacknowledged",
    "copies",
    "dnsbl_listed_accepted",
)
# Counts that fail a run whenever they are not 0; GAVE_UP fails it when asked to.
FAILING_COUNTS = ("lost", "duplicated", "unchecked")
GAVE_UP = "gave_up"


@dataclass(frozen=True)
class Delivery:
    """One stored copy: whose mailbox, and for outbound mail whether our signature verified."""

    mailbox: str
    dkim_ours_pass: bool


@dataclass
class Tally:
    counts: dict[str, int]
    waits: dict[str, float]
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def failures(self, *, count_gave_up: bool = False) -> list[str]:
        """What fails the run, as `name count` (empty: it passed)."""
        names = [*FAILING_COUNTS, GAVE_UP] if count_gave_up else list(FAILING_COUNTS)
        return [f"{_label(n)} {self.counts[n]}" for n in names if self.counts[n]]

    @property
    def failed(self) -> bool:
        return bool(self.failures())


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def tally(
    outcomes: Sequence[Outcome],
    delivered: Mapping[str, Sequence[Delivery]],
    queued: Iterable[str],
    bounce_notices: Iterable[str],
) -> Tally:
    queued_set, bounced_notice = set(queued), set(bounce_notices)
    counts = Counter[str]()
    by_kind: dict[str, Counter[str]] = {}
    examples: dict[str, list[str]] = {}

    def note(name: str, outcome: Outcome) -> None:
        counts[name] += 1
        by_kind.setdefault(outcome.message.kind, Counter())[name] += 1
        sample = examples.setdefault(name, [])
        if len(sample) < 5:
            sample.append(
                f"{outcome.message.token} ({outcome.message.kind}): {outcome.final_reply}"
            )

    for outcome in outcomes:
        token, kind = outcome.message.token, outcome.message.kind
        copies = delivered.get(token, ())
        note("sent", outcome)
        if outcome.status == "accepted":
            note("accepted", outcome)
        elif outcome.status == "refused":
            note("refused", outcome)
        elif outcome.status == "gave_up":
            note("gave_up", outcome)
        if outcome.ambiguous:
            note("ambiguous", outcome)
        if copies:
            note("delivered", outcome)
        if len(copies) > 1:
            note("duplicated", outcome)
            counts["copies"] += len(copies) - 1
        in_queue = token in queued_set
        if in_queue:
            note("queued", outcome)
        bounced = outcome.status == "refused" or token in bounced_notice
        if bounced:
            note("bounced", outcome)
        if outcome.status == "accepted" and not copies and not in_queue and not bounced:
            note("lost", outcome)
        if copies and outcome.status != "accepted":
            # Stored although the sender never saw the 250: a reply lost after DATA.
            note("delivered_unacknowledged", outcome)
        if kind == "outbound" and copies and not all(c.dkim_ours_pass for c in copies):
            note("unsigned", outcome)
        if kind == "forbidden" and (outcome.status == "accepted" or copies):
            note("unchecked", outcome)
        if kind == "dnsbl" and (outcome.status == "accepted" or copies):
            note("dnsbl_listed_accepted", outcome)
    waits = [o.waited for o in outcomes if o.status in ("accepted", "refused")]
    accepted_waits = [o.waited for o in outcomes if o.status == "accepted"]
    attempts = [float(o.attempts) for o in outcomes]
    wait_figures = {
        "wait_p50": percentile(waits, 50),
        "wait_p99": percentile(waits, 99),
        "wait_max": max(waits, default=0.0),
        "accepted_wait_p50": percentile(accepted_waits, 50),
        "accepted_wait_p99": percentile(accepted_waits, 99),
        "attempts_p50": percentile(attempts, 50),
        "attempts_p99": percentile(attempts, 99),
    }
    return Tally({n: counts[n] for n in COUNT_NAMES}, wait_figures, by_kind, examples)


MAIN_COLUMNS = (*COUNT_NAMES[:9], GAVE_UP)


def _label(name: str) -> str:
    return name.replace("_", " ")


def render_verdict(result: Tally, *, count_gave_up: bool = False) -> str:
    """One line: the exit status this tally gives and why; gave up named when not counted."""
    failures = result.failures(count_gave_up=count_gave_up)
    line = f"result: FAILED ({', '.join(failures)})" if failures else "result: passed"
    gave_up = result.counts[GAVE_UP]
    if gave_up and not count_gave_up:
        line += (
            f"; gave up {gave_up} (never accepted, still at the sender: not counted in the "
            "exit status without --gave-up-fails)"
        )
    return line


def render_table(result: Tally, title: str) -> str:
    """A markdown table: the required counts and waits, then the other counts by kind."""
    c, w = result.counts, result.waits
    head = [*(_label(k) for k in MAIN_COLUMNS), "wait p50", "wait p99"]
    row = [str(c[k]) for k in MAIN_COLUMNS] + [f"{w['wait_p50']:.1f} s", f"{w['wait_p99']:.1f} s"]
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| " + " | ".join(row) + " |",
        "",
        "| kind | " + " | ".join(k for k in c if k != "copies") + " |",
        "|---|" + "---|" * (len(c) - 1),
    ]
    for kind, kc in sorted(result.by_kind.items()):
        lines.append(f"| {kind} | " + " | ".join(str(kc[k]) for k in c if k != "copies") + " |")
    lines += [
        "",
        f"waits (first attempt to 250/5xx): p50 {w['wait_p50']:.1f} s, p99 {w['wait_p99']:.1f} s,"
        f" max {w['wait_max']:.1f} s; accepted only p50 {w['accepted_wait_p50']:.1f} s, p99"
        f" {w['accepted_wait_p99']:.1f} s; attempts p50 {w['attempts_p50']:.0f}, p99"
        f" {w['attempts_p99']:.0f}; extra copies {c['copies']}",
    ]
    return "\n".join(lines)
