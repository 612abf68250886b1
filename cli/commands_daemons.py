"""`postwarden policyd`: the Postfix policy server (milterd lives in commands_milterd.py)."""

from __future__ import annotations

import click

from cli.context import CliContext, pass_cli


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


COMMANDS: list[click.Command] = [policyd]
