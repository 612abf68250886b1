"""`postwarden aliases|queue|send-test|check`: the mail system's day-to-day commands."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from cli.context import EXIT_FAILURE, EXIT_USAGE, CliContext, pass_cli

if TYPE_CHECKING:
    from postwarden.appliance.mail_queue import QueuedMessage
    from postwarden.store.base import Store

# postqueue/postsuper answer in well under a second; a hung one must not hang the CLI.
POSTFIX_COMMAND_TIMEOUT = 60.0


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(message, err=True)
    raise SystemExit(code)


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


# --- aliases ---------------------------------------------------------------------------


@click.group("aliases")
def aliases() -> None:
    """Forwarding rules: alias, group, vacation copy, external address (live, no reload)."""


@aliases.command("add")
@click.argument("address")
@click.argument("targets", nargs=-1, required=True)
@pass_cli
def aliases_add(cli_ctx: CliContext, address: str, targets: tuple[str, ...]) -> None:
    """Forward ADDRESS to TARGETS (replaces its previous rule).

    \b
    Bare names get the main domain:
      postwarden aliases add manager r.johnson              (alias)
      postwarden aliases add sales j.smith r.johnson        (group)
      postwarden aliases add r.johnson j.smith r.johnson    (keep a copy and forward)
      postwarden aliases add ceo ceo@gmail.com              (external address)
    """
    from postwarden.appliance.aliases import AliasError, describe, find_loop, make_rule

    cfg = cli_ctx.config()
    try:
        rule = make_rule(
            address,
            targets,
            main_domain=cfg.mail.main_domain,
            local_domains=cfg.mail.local_domains,
        )
    except AliasError as exc:
        _fail(f"aliases add: {exc}", EXIT_USAGE)

    async def work(store: Store) -> list[str] | None:
        loop = find_loop(await store.list_aliases(), rule)
        if loop is None:
            await store.set_alias(rule.address, list(rule.targets))
        return loop

    loop = cli_ctx.with_store(work)
    if loop is not None:
        _fail(f"aliases add: refused, it would close a forwarding loop: {' -> '.join(loop)}")
    click.echo(f"added {describe(rule, cfg.mail.local_domains)}")


@aliases.command("remove")
@click.argument("address")
@pass_cli
def aliases_remove(cli_ctx: CliContext, address: str) -> None:
    """Remove ADDRESS's forwarding rule (exit 1 if it had none)."""
    from postwarden.appliance.aliases import AliasError, normalize_address

    cfg = cli_ctx.config()
    try:
        addr = normalize_address(address, cfg.mail.main_domain)
    except AliasError as exc:
        _fail(f"aliases remove: {exc}", EXIT_USAGE)

    async def work(store: Store) -> bool:
        return bool(await store.remove_alias(addr))

    if not cli_ctx.with_store(work):
        _fail(f"aliases remove: {addr} has no forwarding rule")
    click.echo(f"removed {addr}")


@aliases.command("show")
@click.argument("address", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print {address: [targets]} as JSON.")
@pass_cli
def aliases_show(cli_ctx: CliContext, address: str | None, as_json: bool) -> None:
    """Show all forwarding rules, or ADDRESS's (exit 1 if it has none)."""
    from postwarden.appliance.aliases import AliasError, AliasRule, describe, normalize_address

    cfg = cli_ctx.config()
    addr: str | None = None
    if address is not None:
        try:
            addr = normalize_address(address, cfg.mail.main_domain)
        except AliasError as exc:
            _fail(f"aliases show: {exc}", EXIT_USAGE)

    async def work(store: Store) -> dict[str, list[str]]:
        if addr is None:
            return dict(await store.list_aliases())
        targets = await store.get_alias(addr)
        return {} if targets is None else {addr: list(targets)}

    rules = cli_ctx.with_store(work)
    if addr is not None and not rules:
        _fail(f"aliases show: {addr} has no forwarding rule")
    if as_json:
        _print_json(rules)
        return
    for key in sorted(rules):
        click.echo(describe(AliasRule(key, tuple(rules[key])), cfg.mail.local_domains))


# --- queue -----------------------------------------------------------------------------

_postfix_config_option = click.option(
    "--postfix-config",
    "postfix_config",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Postfix config directory of the instance (postqueue/postsuper -c DIR); "
    "default: Postfix's own (/etc/postfix).",
)


def _run_postfix(argv: list[str]) -> str:
    """Run postqueue/postsuper; their failure ends the command with exit 1 and their words."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=POSTFIX_COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        _fail(f"{argv[0]}: not installed (install Debian's postfix package)")
    except subprocess.TimeoutExpired:
        _fail(f"{' '.join(argv)}: no answer within {POSTFIX_COMMAND_TIMEOUT:.0f}s")
    if done.returncode != 0:
        _fail(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout + done.stderr


def _queued(postfix_config: Path | None) -> list[QueuedMessage]:
    """Everything in the queue, from `postqueue -j`; unreadable output exits 1 with why."""
    from postwarden.appliance.mail_queue import QueueError, list_argv, parse_queue

    try:
        return parse_queue(_run_postfix(list_argv(postfix_config)))
    except QueueError as exc:
        _fail(f"queue: {exc}")


@click.group("queue")
def queue() -> None:
    """Postfix's mail queue: list, resend, delete, flush (over postqueue/postsuper)."""


@queue.command("list")
@_postfix_config_option
@click.option(
    "--queue",
    "queue_name",
    type=click.Choice(["deferred", "active", "incoming", "hold", "maildrop"]),
    default=None,
    help="Only messages in this queue.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON array of messages.")
def queue_list(postfix_config: Path | None, queue_name: str | None, as_json: bool) -> None:
    """Each queued message with its recipients and why delivery was deferred."""
    from postwarden.appliance.mail_queue import format_message, select

    messages = select(_queued(postfix_config), queue_name)
    if as_json:
        _print_json([m.as_json() for m in messages])
        return
    if not messages:
        click.echo("queue is empty")
        return
    for message in messages:
        for line in format_message(message):
            click.echo(line)
    click.echo(f"{len(messages)} message(s)")


def _one_or_all_argv(
    command: str,
    queue_id: str | None,
    all_: bool,
    build: Callable[[Path | None, str | None], list[str]],
    postfix_config: Path | None,
) -> list[str]:
    """The postqueue/postsuper command line for one ID or --all; a bad choice or ID exits 2."""
    from postwarden.appliance.mail_queue import QueueError

    if (queue_id is None) == (not all_):
        _fail(f"queue {command}: give a queue ID or --all (not both)", EXIT_USAGE)
    try:
        return build(postfix_config, queue_id)
    except QueueError as exc:
        _fail(f"queue {command}: {exc}", EXIT_USAGE)


@queue.command("resend")
@click.argument("queue_id", required=False)
@click.option("--all", "all_", is_flag=True, help="Every queued message.")
@_postfix_config_option
def queue_resend(queue_id: str | None, all_: bool, postfix_config: Path | None) -> None:
    """Try delivering QUEUE_ID (or --all) now."""
    from postwarden.appliance.mail_queue import resend_argv

    argv = _one_or_all_argv("resend", queue_id, all_, resend_argv, postfix_config)
    # `postqueue -i` exits 0 for an id it does not have: look first, so a typo is not "done".
    if queue_id is not None and queue_id not in {m.queue_id for m in _queued(postfix_config)}:
        _fail(f"queue resend: no message {queue_id} in the queue")
    _run_postfix(argv)
    click.echo(f"queued for delivery now: {queue_id or 'all messages'}")


@queue.command("delete")
@click.argument("queue_id", required=False)
@click.option("--all", "all_", is_flag=True, help="Every queued message.")
@_postfix_config_option
def queue_delete(queue_id: str | None, all_: bool, postfix_config: Path | None) -> None:
    """Delete QUEUE_ID (or --all) from the queue, without bouncing it."""
    from postwarden.appliance.mail_queue import delete_argv, deleted_count

    argv = _one_or_all_argv("delete", queue_id, all_, delete_argv, postfix_config)
    count = deleted_count(_run_postfix(argv))
    if queue_id is not None and count == 0:
        _fail(f"queue delete: no message {queue_id} in the queue")
    click.echo(f"deleted {count} message{'' if count == 1 else 's'}")


@queue.command("flush")
@_postfix_config_option
def queue_flush(postfix_config: Path | None) -> None:
    """Attempt delivery of all queued mail now (postqueue -f)."""
    from postwarden.appliance.mail_queue import resend_argv

    _run_postfix(resend_argv(postfix_config, None))
    click.echo("flushed: delivery of every queued message attempted now")


# --- send-test -------------------------------------------------------------------------


@click.command("send-test")
@click.option("--from", "sender", required=True, help="Envelope and header sender.")
@click.option("--to", "recipient", required=True, help="Recipient address.")
@click.option(
    "--server",
    default=None,
    help="Send directly through this outbound relay from [[mail.relays]] (by name); "
    "default: the local Postfix.",
)
@click.option("--subject", default="postwarden test message", show_default=True)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Local Postfix address (no --server)."
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Local port (default smtp_port)."
)
@click.option("--timeout", type=click.FloatRange(min=1), default=30.0, show_default=True)
@pass_cli
def send_test(
    cli_ctx: CliContext,
    sender: str,
    recipient: str,
    server: str | None,
    subject: str,
    host: str,
    port: int | None,
    timeout: float,
) -> None:
    """Send a test message; exit 0 when the server accepted it, 1 with its reply otherwise."""
    from postwarden.appliance.send_test import (
        SendTestError,
        build_message,
        send_local,
        send_via_relay,
    )

    cfg = cli_ctx.config()
    message = build_message(sender, recipient, subject, hostname=cfg.mail.hostname)
    try:
        if server is None:
            target = send_local(
                message, host, port or cfg.mail.smtp_port, timeout, helo=cfg.mail.helo
            )
        else:
            relay = next((r for r in cfg.mail.relays if r.name == server), None)
            if relay is None:
                names = ", ".join(r.name for r in cfg.mail.relays) or "none configured"
                _fail(f"send-test: no relay named {server!r} (relays: {names})", EXIT_USAGE)
            target = send_via_relay(message, relay, cfg.mail.tls.ca, timeout, helo=cfg.mail.helo)
    except SendTestError as exc:
        _fail(f"send-test: not accepted: {exc}")
    click.echo(f"accepted by {target}: {message['Message-ID']}")


# --- check dns, check backend ----------------------------------------------------------


@click.group("check")
def check() -> None:
    """Checks of the gateway's surroundings."""


@check.command("dns")
@click.argument("domain")
@click.option("--ip", default=None, help="The gateway's public IP (default: the A record).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@pass_cli
def check_dns(cli_ctx: CliContext, domain: str, ip: str | None, as_json: bool) -> None:
    """A, MX, PTR, SPF, DKIM and DMARC of DOMAIN, each pass/fail with what to publish.

    Exit 0 when every check passes, 1 otherwise.
    """
    from postwarden.dns.readiness_lookups import gather_facts
    from postwarden.dns.readiness_report import DnsReportError, build_report

    cfg = cli_ctx.config()
    try:
        facts = gather_facts(cfg, domain, ip)
    except DnsReportError as exc:
        _fail(f"check dns: {exc}", EXIT_USAGE)
    report = build_report(facts)
    if as_json:
        _print_json(report.as_json())
    else:
        for line in report.lines():
            click.echo(line)
    if not report.all_passed:
        raise SystemExit(EXIT_FAILURE)


@check.command("backend")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds for the connect and for each answer awaited.",
)
@pass_cli
def check_backend(cli_ctx: CliContext, as_json: bool, timeout: float) -> None:
    """Reach each [gateway] backend service as the gateway would, without logging in.

    Per service: reachable, the greeting, STARTTLS offered and accepted (or TLS at once),
    the TLS version and cipher, and whether the certificate chains to gateway.ca and
    names the right host. Exit 0 when every service is verified (an unencrypted one
    passes with a warning), 1 when any is not, 2 when gateway mode is off or unusable.
    """
    from postwarden.appliance.backend_check import BackendCheckError, check_backend

    cfg = cli_ctx.config()
    try:
        report = check_backend(cfg.gateway, helo=cfg.mail.helo, timeout=timeout)
    except BackendCheckError as exc:
        _fail(f"check backend: {exc}", EXIT_USAGE)
    if as_json:
        _print_json(report.as_json())
    else:
        for line in report.lines():
            click.echo(line)
        for c in report.checks:
            if c.warning is not None:
                click.echo(f"warning: {c.service}: {c.warning}", err=True)
    if not report.all_passed:
        raise SystemExit(EXIT_FAILURE)


COMMANDS: list[click.Command] = [aliases, queue, send_test, check]
