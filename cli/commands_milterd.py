"""`postwarden milterd`: the DKIM milter (signing outgoing, verifying inbound mail)."""

from __future__ import annotations

import logging

import click

from cli.context import CliContext, pass_cli


@click.command("milterd")
@pass_cli
def milterd(cli_ctx: CliContext) -> None:
    """Run the DKIM milter (Postfix smtpd_milters, protocol 6) until SIGTERM."""
    from milterd.listener_processes import run
    from postwarden.daemon.log_lines import setup_logging
    from postwarden.daemon.startup import StartupError, log_startup_failure

    cfg = cli_ctx.config()  # a bad file: file, key and reason on stderr, exit 2
    # Unbuffered: libmilter's threads have no housekeeping task that would flush a batch.
    setup_logging(cfg.milterd.log_level, buffered=False)
    try:
        code = run(cfg)
    except StartupError as exc:
        code = log_startup_failure(logging.getLogger("postwarden.milterd"), "milterd", exc)
    raise SystemExit(code)


COMMANDS: list[click.Command] = [milterd]
