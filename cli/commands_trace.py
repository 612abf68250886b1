"""`postwarden trace`: follow a message through Postfix's, policyd's and milterd's logs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import click

from cli.context import EXIT_FAILURE, EXIT_USAGE
from postwarden.appliance.mail_trace import LogLine, TraceQuery, trace

# Where the appliance's logs are without systemd (scripts/install.sh): Postfix's postlogd
# writes mail.log, our daemons their own files; the newest rotation is plain text too.
DEFAULT_LOGS = (
    Path("/var/log/mail.log"),
    Path("/var/log/postwarden/policyd.log"),
    Path("/var/log/postwarden/milterd.log"),
)
JOURNAL_UNITS = ("postfix@-", "postwarden-policyd", "postwarden-milterd")
_AGO = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str, now: datetime) -> datetime:
    """`90m`, `2h`, `1d` before now, or a local time `YYYY-MM-DD[ HH:MM[:SS]]`."""
    if match := _AGO.match(text.strip()):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match[2]]
        return now - timedelta(**{unit: int(match[1])})
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give an age (90m, 2h, 1d) or a time (2026-12-03 14:00)"
        ) from None


def _read_logs(paths: tuple[Path, ...], since: datetime | None) -> list[str]:
    if paths:
        chosen = list(paths)
    else:
        chosen = [p for base in DEFAULT_LOGS for p in (base.with_name(base.name + ".1"), base)]
        chosen = [p for p in chosen if p.is_file()]
        if not any(p.name == "mail.log" for p in chosen):
            return _journal(since)  # under systemd Postfix and our daemons log there
    texts: list[str] = []
    for path in chosen:
        try:
            texts += path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            click.echo(f"error: cannot read {path}: {exc.strerror}", err=True)
            raise SystemExit(EXIT_FAILURE) from None
    return texts


def _journal(since: datetime | None) -> list[str]:
    if shutil.which("journalctl") is None:
        click.echo(
            "error: no /var/log/mail.log and no journal: name the log files with --log",
            err=True,
        )
        raise SystemExit(EXIT_FAILURE)
    argv = ["journalctl", "--no-pager", "-o", "short", *(f"--unit={u}" for u in JOURNAL_UNITS)]
    if since is not None:
        argv.append(f"--since={since:%Y-%m-%d %H:%M:%S}")
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        click.echo(f"error: journalctl: {done.stderr.strip()}", err=True)
        raise SystemExit(EXIT_FAILURE)
    return done.stdout.splitlines()


def _line_json(line: LogLine) -> dict[str, object]:
    return {
        "time": line.when.isoformat() if line.when else None,
        "source": line.source,
        "queue_id": line.queue_id,
        "line": line.text,
    }


@click.command("trace")
@click.argument("queue_id", required=False)
@click.option("--from", "sender", help="Messages from this envelope sender.")
@click.option("--to", "recipient", help="Messages to this recipient.")
@click.option("--since", help="Only lines after this: an age (90m, 2h, 1d) or a time.")
@click.option(
    "--log",
    "logs",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A log file to read (repeatable; default: mail.log and policyd's and milterd's logs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def trace_command(
    queue_id: str | None,
    sender: str | None,
    recipient: str | None,
    since: str | None,
    logs: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Follow a message (QUEUE_ID, or by --from / --to) through the logs.

    Each message's lines in time order: the client's connection, policyd's decision and
    rule at RCPT and DATA, milterd's DKIM result, and each delivery (sent, deferred,
    bounced, and why). A search by sender or recipient also lists the attempts refused
    before they were queued. Exit 1 when nothing matches.
    """
    if queue_id is None and sender is None and recipient is None:
        click.echo("error: give a QUEUE_ID, --from or --to", err=True)
        raise SystemExit(EXIT_USAGE)
    now = datetime.now()
    start = parse_since(since, now) if since else None
    query = TraceQuery(queue_id, sender, recipient, start)
    messages, refused = trace(_read_logs(logs, start), query, now.year)
    if as_json:
        data = {
            "messages": [
                {
                    "queue_id": m.queue_id,
                    "outcomes": m.outcomes,
                    "lines": [_line_json(ln) for ln in m.lines],
                }
                for m in messages
            ],
            "refused": [_line_json(ln) for ln in refused],
        }
        click.echo(json.dumps(data, indent=2))
    else:
        for message in messages:
            click.echo(f"== {message.queue_id}")
            for line in message.lines:
                click.echo(line.text)
        if refused:
            click.echo("== refused before queueing")
            for line in refused:
                click.echo(line.text)
    if not messages and not refused:
        if not as_json:
            click.echo("no message matches", err=True)
        raise SystemExit(EXIT_FAILURE)


COMMANDS: list[click.Command] = [trace_command]
