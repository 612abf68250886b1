"""`postwarden config check|render|apply`: the one config turned into Postfix and Dovecot files."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from cli.context import EXIT_FAILURE, EXIT_USAGE, CliContext, pass_cli
from postwarden.appliance.render import (
    SECRET_FILES,
    Layout,
    RenderError,
    check_tls_files,
    render_all,
    write_rendered,
)
from postwarden.config import Config, ConfigError, load_config
from postwarden.config.hazards import Hazard, config_hazards
from postwarden.config.loading import config_path

CHECK_TIMEOUT = 60  # seconds for `postfix check` / `doveconf -n`


class ApplyError(Exception):
    """A rendered file was refused by Postfix or Dovecot, or a tool could not run."""


@click.group("config")
def config_group() -> None:
    """Check the config file, and render or apply it to Postfix and Dovecot."""


def _hazard_lines(path: Path, hazards: list[Hazard]) -> tuple[list[str], list[str]]:
    """Refusals and warnings as operator lines: `<file>: [warning: ]<key>: <why>`."""
    errors = [f"{path}: {h.key}: {h.message}" for h in hazards if h.refuse]
    warnings = [f"{path}: warning: {h.key}: {h.message}" for h in hazards if not h.refuse]
    return errors, warnings


def _render(cli_ctx: CliContext, layout: Layout) -> tuple[Config, dict[str, str]]:
    cfg = cli_ctx.config()  # exits 2 with file, key and reason when the file is bad
    path = config_path(cli_ctx.config_file)
    errors, warnings = _hazard_lines(path, config_hazards(cfg))
    for line in [*errors, *warnings]:
        click.echo(line, err=True)
    if errors:
        raise SystemExit(EXIT_USAGE)
    try:
        check_tls_files(cfg)
        return cfg, render_all(cfg, layout)
    except RenderError as exc:
        click.echo(f"{path}: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None


@config_group.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_cli
def check(cli_ctx: CliContext, as_json: bool) -> None:
    """Validate the config file (and everything it names); exit 2 saying why if it is bad.

    Settings that reopen a hole are named: refused ones (exit 2) and warnings (exit 0).
    """
    path = config_path(cli_ctx.config_file)
    hazards: list[Hazard] = []
    problems: list[str] = []
    try:
        cfg = load_config(cli_ctx.config_file, missing_ok=cli_ctx.config_file is None)
        hazards = config_hazards(cfg)
        check_tls_files(cfg)
        render_all(cfg, Layout.debian())
    except ConfigError as exc:
        problems = exc.problems
    except RenderError as exc:
        problems = [str(exc)]
    errors, warnings = _hazard_lines(path, hazards)
    errors += [f"{path}: {p}" for p in problems]
    if as_json:
        report = {
            "ok": not errors,
            "config": str(path),
            "errors": [e.removeprefix(f"{path}: ") for e in errors],
            "warnings": [{"key": h.key, "message": h.message} for h in hazards if not h.refuse],
        }
        click.echo(json.dumps(report))
    else:
        for line in [*errors, *warnings]:
            click.echo(line, err=True)
        if not errors:
            click.echo(f"OK: {path}" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    if errors:
        raise SystemExit(EXIT_USAGE)


_KEY_SEGMENT = r"[^.\[\]]+(?:\[\d+\])*"
_KEY_RE = re.compile(rf"{_KEY_SEGMENT}(?:\.{_KEY_SEGMENT})*")
_KEY_PART = re.compile(r"[^.\[\]]+|(?<=\[)\d+(?=\])")


def config_value(cfg: Config, key: str) -> Any:
    """The effective value (defaults included) at a dotted key such as `mail.hostname`.

    `mail.relays[0].host` (or `mail.relays.0.host`) picks a list item. KeyError when no
    such key exists.
    """
    if not _KEY_RE.fullmatch(key):
        raise KeyError(key)
    value: Any = cfg.model_dump(mode="json")
    parts = _KEY_PART.findall(key)
    for part in parts:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(key)
    return value


def _plain(value: Any) -> str:
    """A scalar as a shell script wants it (true/false, an empty line for unset); else JSON."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # `delay = 300` reads back as 300, for shell arithmetic
    return json.dumps(value)


def _lines(value: Any, fields: list[str] | None) -> list[str]:
    """A value as lines for a shell loop: a list one item per line (a single value is one
    item, an unset one none), each item plain; with `fields`, the named fields of each table
    item, tab-separated (defaults included).

    ValueError when an item is not a scalar, or (with fields) not a table with those fields."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if fields is None:
        if any(isinstance(item, dict | list) for item in items):
            raise ValueError("is not a list of single values (try --fields or --json)")
        return [_plain(item) for item in items]
    lines = []
    for item in items:
        if not isinstance(item, dict) or any(f not in item for f in fields):
            raise ValueError(f"has no field(s) {', '.join(fields)} in every item")
        lines.append("\t".join(_plain(item[f]) for f in fields))
    return lines


@config_group.command("get")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print the value as JSON, even a scalar.")
@click.option(
    "--lines",
    "as_lines",
    is_flag=True,
    help="Print a list one item per line, each plain (a single value: one line, unset: none).",
)
@click.option(
    "--fields",
    metavar="NAME,...",
    help="Print these fields of each table in a list (or of one table), tab-separated, "
    "one line per table (e.g. dkim.keys --fields domain,selector,algorithm,key).",
)
@pass_cli
def get(cli_ctx: CliContext, key: str, as_json: bool, as_lines: bool, fields: str | None) -> None:
    """Print the effective value of KEY (e.g. mail.hostname), defaults included.

    Scalars print plain (true/false, an empty line when unset), lists and tables as JSON;
    --lines and --fields print lists for shell loops. An unknown key exits 2.
    """
    cfg = cli_ctx.config()
    try:
        value = config_value(cfg, key)
    except KeyError:
        click.echo(
            f"error: {key!r} is not a config key (e.g. mail.hostname, network.trusted; "
            "see the config reference in README.md)",
            err=True,
        )
        raise SystemExit(EXIT_USAGE) from None
    if as_lines or fields is not None:
        names = [f.strip() for f in fields.split(",") if f.strip()] if fields else None
        try:
            lines = _lines(value, names)
        except ValueError as exc:
            click.echo(f"error: {key!r} {exc}", err=True)
            raise SystemExit(EXIT_USAGE) from None
        for line in lines:
            click.echo(line)
        return
    click.echo(json.dumps(value) if as_json else _plain(value))


@config_group.command("render")
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write postfix/ and dovecot/ into.",
)
@click.option("--json", "as_json", is_flag=True, help="List the written files as JSON.")
@pass_cli
def render(cli_ctx: CliContext, target: Path, as_json: bool) -> None:
    """Write the Postfix and Dovecot files for this config into DIR (nothing is applied)."""
    _, files = _render(cli_ctx, Layout.debian())
    written = write_rendered(files, target)
    if as_json:
        click.echo(json.dumps([str(p) for p in written]))
    else:
        for path in written:
            click.echo(str(path))


def _run_on_terminal(argv: list[str]) -> tuple[int, str]:
    """Exit code and words of a Postfix command whose stderr is a pseudo-terminal.

    Postfix commands print warnings and fatal errors only when stderr is a terminal, and
    otherwise only to syslog (which containers often lack): a refusal would come with no
    reason.
    """
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + CHECK_TIMEOUT
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([master], [], [], remaining)[0]:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the command and its children closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(argv, CHECK_TIMEOUT)
    finally:
        os.close(master)
    code = proc.wait(timeout=CHECK_TIMEOUT)
    return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def _run_check(argv: list[str]) -> None:
    code, said = _tool(argv)
    # `postfix check` may exit 0 after printing a fatal error; that is a refusal too.
    if code != 0 or "fatal:" in said.lower():
        raise ApplyError(f"{' '.join(argv)} refused the new configuration:\n{said}")


def check_rendered(staging: Path) -> None:
    """Run Postfix's and Dovecot's own checks against files staged under `staging`."""
    _run_check(["postfix", "-c", str(staging / "postfix"), "check"])
    _run_check(["doveconf", "-n", "-c", str(staging / "dovecot" / "dovecot.conf")])


def install_rendered(files: dict[str, str], staging: Path, layout: Layout) -> list[Path]:
    """Move staged files over the live ones, each by an atomic rename within its directory."""
    dirs = {"postfix": layout.postfix_dir, "dovecot": layout.dovecot_dir}
    installed = []
    for name in sorted(files):
        kind, _, base = name.partition("/")
        live = dirs[kind] / base
        live.parent.mkdir(parents=True, exist_ok=True)
        tmp = live.with_name(f".{base}.postwarden-new")
        shutil.copyfile(staging / name, tmp)
        os.chmod(tmp, 0o600 if name in SECRET_FILES else 0o644)
        os.replace(tmp, live)
        installed.append(live)
    return installed


def _tool(argv: list[str]) -> tuple[int, str]:
    """Exit code and diagnostics of a Postfix or Dovecot command (never doveconf's dump).

    Not installed, or hung: ApplyError, in one line.
    """
    try:
        if argv[0] == "postfix":
            code, said = _run_on_terminal(argv)
        else:
            # doveconf -n prints the whole config on stdout; complaints go to stderr.
            done = subprocess.run(
                argv, capture_output=True, text=True, check=False, timeout=CHECK_TIMEOUT
            )
            code, said = done.returncode, done.stderr
    except FileNotFoundError:
        raise ApplyError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise ApplyError(f"{' '.join(argv)} did not finish in {CHECK_TIMEOUT}s") from None
    return code, said.strip()


def reload_postfix(layout: Layout) -> str:
    pf = ["postfix", "-c", str(layout.postfix_dir)]
    if _tool([*pf, "status"])[0] != 0:
        return "postfix: not running, the new configuration is used at its next start"
    code, out = _tool([*pf, "reload"])
    if code != 0:
        raise ApplyError(f"postfix reload failed: {out}")
    return "postfix: reloaded"


def reload_dovecot(layout: Layout) -> str:
    code, out = _tool(["doveadm", "-c", str(layout.dovecot_dir / "dovecot.conf"), "reload"])
    if code != 0 and "not running" in out:
        return "dovecot: not running, the new configuration is used at its next start"
    if code != 0:
        raise ApplyError(f"dovecot reload failed: {out}")
    return "dovecot: reloaded"


@config_group.command("apply")
@click.option(
    "--postfix-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Postfix config directory (default /etc/postfix).",
)
@click.option(
    "--dovecot-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Dovecot config directory (default /etc/dovecot).",
)
@click.option("--no-reload", is_flag=True, help="Write and check only; do not reload.")
@pass_cli
def apply(
    cli_ctx: CliContext, postfix_dir: Path | None, dovecot_dir: Path | None, no_reload: bool
) -> None:
    """Render, check with `postfix check` and `doveconf -n`, install, reload.

    The new files are checked in a staging directory first: if either check fails nothing
    live is touched and the reason is printed (exit 1).
    """
    layout = Layout.debian()
    layout = dataclasses.replace(
        layout,
        postfix_dir=postfix_dir or layout.postfix_dir,
        dovecot_dir=dovecot_dir or layout.dovecot_dir,
    )
    _, files = _render(cli_ctx, layout)
    with tempfile.TemporaryDirectory(prefix="postwarden-apply-") as tmp:
        staging = Path(tmp)
        # postfix check runs helpers that drop privileges and must read the staged files.
        os.chmod(staging, 0o755)  # noqa: S103
        write_rendered(files, staging)
        try:
            check_rendered(staging)
        except ApplyError as exc:
            click.echo(f"not applied: {exc}", err=True)
            raise SystemExit(EXIT_FAILURE) from None
        for path in install_rendered(files, staging, layout):
            click.echo(f"wrote {path}")
    if no_reload:
        return
    try:
        # Dovecot first: Postfix's smtpd_sasl_path may now name a socket only the reloaded
        # Dovecot creates (frontd turned off: private/auth again), and an smtpd that finds
        # no SASL server dies with "no SASL authentication mechanisms". The other way round,
        # Postfix still points at frontd, which stands in while Dovecot's socket moves.
        click.echo(reload_dovecot(layout))
        click.echo(reload_postfix(layout))
    except ApplyError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(EXIT_FAILURE) from None


COMMANDS: list[click.Command] = [config_group]
