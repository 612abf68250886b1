"""The `postwarden` console script: one click group; each subcommand lives in its own module."""

from __future__ import annotations

import click

from cli import (
    commands_config,
    commands_daemons,
    commands_dkim,
    commands_explain,
    commands_greylist,
    commands_lists,
    commands_mail,
    commands_milterd,
    commands_trace,
    commands_users,
)
from cli.context import CliContext


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    envvar="POSTWARDEN_CONFIG",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default /etc/postwarden/postwarden.toml; env POSTWARDEN_CONFIG).",
)
@click.version_option(package_name="postwarden")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None) -> None:
    """postwarden: policy and filtering sidecar for Postfix and Dovecot."""
    ctx.obj = CliContext(config_file)


for module in (
    commands_daemons,
    commands_milterd,
    commands_lists,
    commands_greylist,
    commands_explain,
    commands_dkim,
    commands_config,
    commands_mail,
    commands_trace,
    commands_users,
):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    cli()
