"""`postwarden trace`: one message's way through Postfix's, policyd's and milterd's log lines.

Pure: lines in, traced messages out (the CLI reads the files). Postfix names a message by
its queue id from the moment smtpd accepts it (`QID: client=…`); policyd's and milterd's
decision lines carry the same id (docs/ARCHITECTURE.md, "Log lines"), except policyd's
RCPT-stage lines, which Postfix sends before there is a queue id: those are joined through
Postfix's `instance` attribute, which the DATA-stage line of the same message carries with
the queue id. Refusals before queueing (NOQUEUE) have no id; a search by sender or
recipient lists them apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

# "Dec  3 14:05:47 host postfix/smtpd[123]: …" (syslog, journalctl -o short, postlogd)
_SYSLOG = re.compile(r"^(?P<when>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) \S+ (?P<rest>.*)$")
# "2026-12-03 12:12:40,490 INFO postwarden.policyd[123]: …" (our daemons' log files)
_OURS = re.compile(r"^(?P<when>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:,\d+)? (?P<rest>.*)$")
_POSTFIX = re.compile(
    r"(?P<program>postfix(?:-\w+)?/[\w/.-]+)\[(?P<pid>\d+)\]: (?P<qid>[0-9A-Za-z]{6,}|NOQUEUE): "
    r"(?P<body>.*)$"
)
_SMTPD_CONNECT = re.compile(
    r"(?P<program>postfix(?:-\w+)?/[\w/.-]*smtpd)\[(?P<pid>\d+)\]: connect from "
)
_DECISION = re.compile(
    r"\b(?P<daemon>policyd|milterd): (?P<qid>[0-9A-Za-z]{6,}|NOQUEUE): (?P<body>client=.*)$"
)
_FROM = re.compile(r"\bfrom=<(?P<address>[^>]*)>")
_TO = re.compile(r"\bto=<(?P<address>[^>]*)>")
_REFUSING = re.compile(r"\bverdict=(?:REJECT|DEFER_IF_PERMIT)\b")
_INSTANCE = re.compile(r"\binstance=(?P<instance>[^,\s]+)")


@dataclass(frozen=True)
class LogLine:
    """One line of any of the logs, with what trace needs parsed out of it."""

    text: str
    when: datetime | None
    source: str  # "postfix/smtpd", "policyd", "milterd", or "" for a line trace ignores
    queue_id: str | None = None  # None for NOQUEUE and lines without one
    pid: str = ""
    body: str = ""


def _timestamp(text: str, year: int) -> tuple[datetime | None, str]:
    if match := _OURS.match(text):
        return datetime.strptime(match["when"], "%Y-%m-%d %H:%M:%S"), match["rest"]
    if match := _SYSLOG.match(text):
        when = datetime.strptime(f"{year} {match['when']}", "%Y %b %d %H:%M:%S")
        return when, match["rest"]
    return None, text


def parse_line(text: str, year: int) -> LogLine:
    """Recognise a Postfix line or a policyd/milterd decision line (syslog years: `year`)."""
    text = text.rstrip("\n")
    when, rest = _timestamp(text, year)
    if match := _DECISION.search(rest):
        qid = None if match["qid"] == "NOQUEUE" else match["qid"]
        return LogLine(text, when, match["daemon"], qid, body=match["body"])
    if match := _POSTFIX.search(rest):
        qid = None if match["qid"] == "NOQUEUE" else match["qid"]
        return LogLine(text, when, match["program"], qid, match["pid"], match["body"])
    if match := _SMTPD_CONNECT.search(rest):
        return LogLine(text, when, match["program"], None, match["pid"], "connect")
    return LogLine(text, when, "")


@dataclass(frozen=True)
class TraceQuery:
    """What to look for: a queue id, or messages by envelope sender and/or recipient."""

    queue_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    since: datetime | None = None


@dataclass
class TracedMessage:
    """Every line of one message, in time order, and what became of each recipient."""

    queue_id: str
    lines: list[LogLine] = field(default_factory=list)

    @property
    def outcomes(self) -> list[str]:
        """`to=<rcpt>: status=sent (…)` per delivery attempt Postfix logged."""
        return [
            line.body
            for line in self.lines
            if line.source.startswith("postfix") and "status=" in line.body
        ]


def _matches_envelope(line: LogLine, query: TraceQuery) -> bool:
    return (query.sender is None or _has(line, _FROM, query.sender)) and (
        query.recipient is None or _has(line, _TO, query.recipient)
    )


def _wanted_ids(lines: list[LogLine], query: TraceQuery) -> list[str]:
    if query.queue_id is not None:
        return [query.queue_id]
    by_id: dict[str, list[LogLine]] = {}
    for line in lines:
        if line.queue_id is not None:
            by_id.setdefault(line.queue_id, []).append(line)
    # The sender is on qmgr's line, each recipient on its delivery's: both must be found
    # among the lines of one message.
    return [
        qid
        for qid, own in by_id.items()
        if (query.sender is None or any(_has(ln, _FROM, query.sender) for ln in own))
        and (query.recipient is None or any(_has(ln, _TO, query.recipient) for ln in own))
    ]


def _has(line: LogLine, pattern: re.Pattern[str], address: str) -> bool:
    found = pattern.search(line.body)
    return found is not None and found["address"].lower() == address.lower()


def _message(lines: list[LogLine], qid: str) -> TracedMessage:
    own = [ln for ln in lines if ln.queue_id == qid]
    picked = {id(ln) for ln in own}
    # smtpd's "connect from" of the session that received it (the last one by that pid
    # before the message's first line).
    first = next((ln for ln in own if ln.body.startswith("client=")), None)
    if first is not None:
        index = lines.index(first)
        for earlier in reversed(lines[:index]):
            if earlier.pid == first.pid and earlier.body == "connect":
                picked.add(id(earlier))
                break
    # policyd's RCPT-stage lines, through the instance its DATA-stage line names.
    instances = {
        m["instance"]
        for ln in own
        if ln.source == "policyd" and (m := _INSTANCE.search(ln.body)) is not None
    }
    for ln in lines:
        if ln.source == "policyd" and ln.queue_id is None:
            found = _INSTANCE.search(ln.body)
            if found is not None and found["instance"] in instances:
                picked.add(id(ln))
    ordered = [ln for ln in lines if id(ln) in picked]
    return TracedMessage(qid, ordered)


def trace(
    texts: Iterable[str], query: TraceQuery, year: int
) -> tuple[list[TracedMessage], list[LogLine]]:
    """The messages the query names, and the refusals before queueing it matches.

    `texts` are the log lines of every source, in any order; each message's lines come
    back sorted by time (lines of one source keep their order)."""
    lines = [parse_line(t, year) for t in texts]
    lines = [ln for ln in lines if ln.source]
    if query.since is not None:
        lines = [ln for ln in lines if ln.when is None or ln.when >= query.since]
    lines.sort(key=lambda ln: ln.when or datetime.min)
    messages = [_message(lines, qid) for qid in _wanted_ids(lines, query)]
    messages = [m for m in messages if m.lines]
    refused: list[LogLine] = []
    if query.queue_id is None:
        # Postfix's NOQUEUE refusals carry the reply; policyd's say which rule refused.
        picked = {id(ln) for m in messages for ln in m.lines}
        refused = [
            ln
            for ln in lines
            if ln.queue_id is None
            and id(ln) not in picked
            and (ln.body.startswith("reject:") or _REFUSING.search(ln.body))
            and _matches_envelope(ln, query)
        ]
    return messages, refused
