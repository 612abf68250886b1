"""`postwarden lists`: edit the permitted/forbidden lists that policyd applies.

Entries are validated and canonicalised here (postwarden.policy.list_entries.parse_entry) before the
store sees them, so a typo is refused with the reason instead of never matching.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

from cli.context import EXIT_FAILURE, EXIT_USAGE, CliContext, pass_cli
from postwarden.policy.list_entries import InvalidEntry, parse_entry
from postwarden.policy.records import ListEntry, ListName

LIST_NAME = click.Choice([name.value for name in ListName])
MAX_REPORTED_ERRORS = 20  # a file with thousands of bad lines needs the first few, not all
PROGRESS_THRESHOLD_BYTES = 256 * 1024  # smaller imports finish before a bar would help
# An import file is untrusted input: bounded so /dev/zero or one endless line cannot eat the
# memory. An entry is at most 320 characters; the rest of a line is its comment.
MAX_LINE_BYTES = 4096
MAX_IMPORT_BYTES = 64 * 1024 * 1024  # about 4 million entries
SHOWN_CHARS = 80  # of an offending line, in an error message


def _canonical(entries: tuple[str, ...]) -> list[str]:
    """Every entry canonicalised; any invalid one ends the command (exit 2), nothing changed."""
    canonical: list[str] = []
    failed = False
    for text in entries:
        try:
            canonical.append(parse_entry(text))
        except InvalidEntry as exc:
            click.echo(f"error: {exc}", err=True)
            failed = True
    if failed:
        raise SystemExit(EXIT_USAGE)
    return canonical


def _one_line(comment: str) -> str:
    """A comment as it can be exported on one line (the import format is line based)."""
    return " ".join(comment.replace("#", " ").split())


@click.group("lists")
def lists_group() -> None:
    """Permitted and forbidden senders: IPs, networks, mailboxes, domains."""


@lists_group.command("add")
@click.argument("list_name", metavar="permitted|forbidden", type=LIST_NAME)
@click.argument("entries", metavar="ENTRY...", nargs=-1, required=True)
@click.option("--comment", default="", help="Note stored with each entry.")
@pass_cli
def add(cli_ctx: CliContext, list_name: str, entries: tuple[str, ...], comment: str) -> None:
    """Add entries to a list (all or none).

    Forms: 192.0.2.1, 10.0.0.0/8, 192.168.2.0:255.255.255.0, 192.168.1.*, 2001:db8::/32,
    j.smith@test.com, example.com, .example.com (its subdomains).
    """
    name = ListName(list_name)
    unique = dict.fromkeys(_canonical(entries))  # 192.168.1.* and 192.168.1.0/24 are one
    rows = [ListEntry(name, entry, _one_line(comment)) for entry in unique]
    added = cli_ctx.with_store(lambda store: store.add_list_entries(rows))
    click.echo(f"{name.value}: {added} added, {len(rows) - added} already present")


@lists_group.command("remove")
@click.argument("list_name", metavar="permitted|forbidden", type=LIST_NAME)
@click.argument("entries", metavar="ENTRY...", nargs=-1, required=True)
@pass_cli
def remove(cli_ctx: CliContext, list_name: str, entries: tuple[str, ...]) -> None:
    """Remove entries from a list.

    Any spelling works: 192.168.1.* removes 192.168.1.0/24. Exits 1 when some entry
    was not in the list.
    """
    name = ListName(list_name)
    canonical = sorted(set(_canonical(entries)))
    removed = cli_ctx.with_store(lambda store: store.remove_list_entries(name, canonical))
    click.echo(f"{name.value}: {removed} removed")
    if removed < len(canonical):
        click.echo(f"{len(canonical) - removed} of the entries were not in the list", err=True)
        raise SystemExit(EXIT_FAILURE)


@lists_group.command("show")
@click.argument("list_name", metavar="[permitted|forbidden]", type=LIST_NAME, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_cli
def show(cli_ctx: CliContext, list_name: str | None, as_json: bool) -> None:
    """Show both lists, or one."""
    name = ListName(list_name) if list_name else None
    rows = cli_ctx.with_store(lambda store: store.list_entries(name))
    if as_json:
        data = [{"list": r.list_name.value, "entry": r.entry, "comment": r.comment} for r in rows]
        click.echo(json.dumps(data, indent=2))
        return
    if not rows:
        click.echo("(no entries)")
        return
    width = max(len(r.entry) for r in rows)
    for r in rows:
        line = f"{r.list_name.value:<9}  {r.entry:<{width}}  {r.comment}"
        click.echo(line.rstrip())


def _shown(text: str | bytes) -> str:
    """A piece of an untrusted file for an error line: quoted, control characters escaped
    (repr), cut to SHOWN_CHARS."""
    more = f"... ({len(text) - SHOWN_CHARS} more)" if len(text) > SHOWN_CHARS else ""
    return repr(text[:SHOWN_CHARS]) + more


def _escaped(text: str, limit: int = 4 * SHOWN_CHARS) -> str:
    """Text that may quote the file (a reason), unquoted, with control characters escaped."""
    cut = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    return cut + ("..." if len(text) > limit else "")


class ImportFileError(Exception):
    """The file cannot be imported at all (too large, a line too long); names file:line."""


def _read_lines(stream: BinaryIO, source: str) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, text or None when not UTF-8, raw bytes) for each line, within the bounds.

    Read a bounded line at a time, so /dev/zero or a 100 MB line ends at once.
    """
    total = 0
    number = 0
    while raw := stream.readline(MAX_LINE_BYTES + 1):
        number += 1
        total += len(raw)
        if len(raw) > MAX_LINE_BYTES:
            raise ImportFileError(
                f"{source}:{number}: line longer than {MAX_LINE_BYTES} bytes: "
                f"{_shown(raw[:SHOWN_CHARS].decode('utf-8', 'replace'))}..."
            )
        if total > MAX_IMPORT_BYTES:
            raise ImportFileError(
                f"{source}: larger than {MAX_IMPORT_BYTES // (1024 * 1024)} MiB; split it"
            )
        try:
            text: str | None = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            text = None
        yield number, text, raw


def _parse_lines(
    stream: BinaryIO, name: ListName, default_comment: str, source: str, size: int | None
) -> tuple[list[ListEntry], list[str]]:
    """Entries of the plain-text format, and the errors (`source:line: 'text': why`)."""
    entries: dict[str, ListEntry] = {}
    errors: list[str] = []
    with click.progressbar(
        length=size or 0,
        label=f"Reading {source}",
        file=sys.stderr,
        hidden=size is None or size < PROGRESS_THRESHOLD_BYTES,
    ) as bar:
        for number, line, raw in _read_lines(stream, source):
            bar.update(len(raw))
            if line is None:
                shown = _shown(raw.rstrip(b"\r\n"))
                errors.append(f"{source}:{number}: {shown}: not UTF-8 text")
                continue
            text, _, note = line.partition("#")
            text = text.strip()
            if not text:
                continue
            try:
                entry = parse_entry(text)
            except InvalidEntry as exc:
                errors.append(f"{source}:{number}: {_shown(text)}: {_escaped(exc.reason)}")
                continue
            entries[entry] = ListEntry(name, entry, _one_line(note) or default_comment)
    return list(entries.values()), errors


def _read_import(file: str, name: ListName, comment: str) -> tuple[list[ListEntry], list[str]]:
    if file == "-":
        return _parse_lines(sys.stdin.buffer, name, comment, "-", None)
    path = Path(file)
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size if path.is_file() else None
        return _parse_lines(stream, name, comment, file, size)


@lists_group.command("import")
@click.argument("list_name", metavar="permitted|forbidden", type=LIST_NAME)
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--comment", default="", help="Note for entries whose line has none.")
@pass_cli
def import_(cli_ctx: CliContext, list_name: str, file: str, comment: str) -> None:
    """Import a file of entries, one per line (all or none).

    Lines hold addr, addr:mask, CIDR, IPv6 prefix, mailbox or domain. Blank lines are
    skipped; text after '#' is a comment, kept as the entry's note. FILE may be - (stdin).
    One bad line and nothing is imported. A line may hold 4096 bytes, a file 64 MiB.
    """
    name = ListName(list_name)
    try:
        rows, errors = _read_import(file, name, _one_line(comment))
    except OSError as exc:
        click.echo(f"error: cannot read {file}: {exc.strerror or exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except ImportFileError as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo("nothing imported", err=True)
        raise SystemExit(EXIT_USAGE) from None
    if errors:
        for error in errors[:MAX_REPORTED_ERRORS]:
            click.echo(f"error: {error}", err=True)
        if len(errors) > MAX_REPORTED_ERRORS:
            click.echo(f"error: ... and {len(errors) - MAX_REPORTED_ERRORS} more", err=True)
        click.echo(f"{len(errors)} bad line(s): nothing imported", err=True)
        raise SystemExit(EXIT_USAGE)
    added = cli_ctx.with_store(lambda store: store.add_list_entries(rows))
    click.echo(f"{name.value}: {len(rows)} entries read, {added} new")


@lists_group.command("export")
@click.argument("list_name", metavar="permitted|forbidden", type=LIST_NAME)
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True), default="-")
@pass_cli
def export(cli_ctx: CliContext, list_name: str, file: str) -> None:
    """Write a list in the import format (to FILE, or standard output)."""
    name = ListName(list_name)
    rows = cli_ctx.with_store(lambda store: store.list_entries(name))
    lines = [f"# postwarden {name.value} list: {len(rows)} entries"]
    lines += [f"{r.entry}  # {r.comment}" if r.comment else r.entry for r in rows]
    text = "\n".join(lines) + "\n"
    if file == "-":
        click.echo(text, nl=False)
        return
    try:
        Path(file).write_text(text, encoding="utf-8")
    except OSError as exc:
        click.echo(f"error: cannot write {file}: {exc}", err=True)
        raise SystemExit(EXIT_FAILURE) from None
    click.echo(f"{name.value}: {len(rows)} entries written to {file}", err=True)


COMMANDS: list[click.Command] = [lists_group]
