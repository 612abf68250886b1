"""`postwarden policyd` (the policy server), `mapd` (its lookup maps), `frontd` (the front
ends on Postfix's milter and SASL sockets), `supervise` (restarts).

milterd's own command lives in commands_milterd.py.
"""

from __future__ import annotations

import click

from cli.context import CliContext, pass_cli
from postwarden.daemon.service_supervisor import SUPERVISED_DAEMONS


@click.command("policyd")
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Worker processes sharing the sockets (0 = one per CPU); overrides policyd.workers.",
)
@click.option(
    "--maps/--no-maps",
    default=True,
    help="Also serve the lookup maps on policyd.aliases_listen (default), or leave them to "
    "`postwarden mapd` (what the appliance does).",
)
@pass_cli
def policyd(cli_ctx: CliContext, workers: int | None, maps: bool) -> None:
    """Run the Postfix policy server (check_policy_service) until SIGTERM."""
    from policyd.supervisor import run
    from postwarden.config.loading import config_path

    cfg = cli_ctx.config()  # a bad file: file, key and reason on stderr, exit 2
    path = config_path(cli_ctx.config_file) if cli_ctx.config_file else None
    raise SystemExit(run(cfg, path, workers, "all" if maps else "policy"))


@click.command("mapd")
@pass_cli
def mapd(cli_ctx: CliContext) -> None:
    """Serve Postfix's lookup maps (forwarding aliases, mailboxes) until SIGTERM.

    The socketmap on policyd.aliases_listen, in a process of its own: Postfix resolves
    every address through it, so it must not stop when policyd does.
    """
    from policyd.supervisor import run
    from postwarden.config.loading import config_path

    cfg = cli_ctx.config()
    path = config_path(cli_ctx.config_file) if cli_ctx.config_file else None
    raise SystemExit(run(cfg, path, 1, "maps"))


@click.command("frontd")
@pass_cli
def frontd(cli_ctx: CliContext) -> None:
    """Hold Postfix's milter and SASL sockets in front of milterd and Dovecot until SIGTERM.

    Bytes pass through while they answer; while they do not, a session still gets STARTTLS
    and AUTH, then 451 at MAIL (milterd away) or 454 at AUTH (Dovecot away).
    """
    from frontd.server import run
    from postwarden.daemon.startup import EXIT_BAD_CONFIG

    cfg = cli_ctx.config()
    if not cfg.frontd.enabled:
        click.echo(
            "frontd is not enabled in the config ([frontd] enabled = false): Postfix does "
            "not talk to it",
            err=True,
        )
        raise SystemExit(EXIT_BAD_CONFIG)
    raise SystemExit(run(cfg))


@click.command(
    "supervise", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("daemon", type=click.Choice(SUPERVISED_DAEMONS))
@click.argument("daemon_args", nargs=-1, type=click.UNPROCESSED)
@pass_cli
def supervise(cli_ctx: CliContext, daemon: str, daemon_args: tuple[str, ...]) -> None:
    """Run DAEMON [ARGS] and start it again whenever it exits, until SIGTERM.

    What the service units and install.sh run: a daemon killed or crashed is serving again
    within a second; one that keeps dying at start is retried with a growing delay.
    """
    from postwarden.config.loading import config_path
    from postwarden.daemon.log_lines import setup_logging
    from postwarden.daemon.service_supervisor import ServiceSupervisor, daemon_command

    cfg = cli_ctx.config()  # a bad file: file, key and reason on stderr, exit 2
    levels = {"milterd": cfg.milterd.log_level, "frontd": cfg.frontd.log_level}
    setup_logging(levels.get(daemon, cfg.policyd.log_level), buffered=False)
    path = config_path(cli_ctx.config_file) if cli_ctx.config_file else None
    command = daemon_command(daemon, path, daemon_args)
    raise SystemExit(ServiceSupervisor(daemon, command).run())


COMMANDS: list[click.Command] = [policyd, mapd, frontd, supervise]
