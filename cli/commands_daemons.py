"""`postwarden policyd` (the Postfix policy server) and `postwarden supervise` (restarts).

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
@pass_cli
def policyd(cli_ctx: CliContext, workers: int | None) -> None:
    """Run the Postfix policy server (check_policy_service) until SIGTERM."""
    from policyd.supervisor import run
    from postwarden.config.loading import config_path

    cfg = cli_ctx.config()  # a bad file: file, key and reason on stderr, exit 2
    path = config_path(cli_ctx.config_file) if cli_ctx.config_file else None
    raise SystemExit(run(cfg, path, workers))


@click.command("supervise")
@click.argument("daemon", type=click.Choice(SUPERVISED_DAEMONS))
@pass_cli
def supervise(cli_ctx: CliContext, daemon: str) -> None:
    """Run DAEMON and start it again whenever it exits, until SIGTERM.

    What the service units and install.sh run: a daemon killed or crashed is serving again
    within a second; one that keeps dying at start is retried with a growing delay.
    """
    from postwarden.config.loading import config_path
    from postwarden.daemon.log_lines import setup_logging
    from postwarden.daemon.service_supervisor import ServiceSupervisor, daemon_command

    cfg = cli_ctx.config()  # a bad file: file, key and reason on stderr, exit 2
    setup_logging(getattr(cfg, daemon).log_level, buffered=False)
    path = config_path(cli_ctx.config_file) if cli_ctx.config_file else None
    raise SystemExit(ServiceSupervisor(daemon, daemon_command(daemon, path)).run())


COMMANDS: list[click.Command] = [policyd, supervise]
