"""`postwarden milterd`: the DKIM milter (signing outgoing, verifying inbound mail)."""

from __future__ import annotations

import logging

import click

from cli.context import EXIT_USAGE, CliContext, pass_cli


@click.command("milterd")
@pass_cli
def milterd(cli_ctx: CliContext) -> None:
    """Run the DKIM milter (Postfix smtpd_milters, protocol 6) until SIGTERM."""
    from milterd.server import MilterdStartError, run

    cfg = cli_ctx.config()  # a bad file: file, key and reason on stderr, exit 2
    logging.basicConfig(
        level=cfg.milterd.log_level.upper(),
        format="%(asctime)s milterd[%(process)d] %(levelname)s %(message)s",
    )
    try:
        code = run(cfg)
    except MilterdStartError as exc:
        click.echo(f"milterd: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    raise SystemExit(code)


COMMANDS: list[click.Command] = [milterd]
