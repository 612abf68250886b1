"""What every subcommand shares: the config file (loaded once, lazily) and error reporting."""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from postwarden.config import Config, ConfigError, load_config

EXIT_OK = 0
EXIT_FAILURE = 1  # the operation failed (a check said no, a lookup failed)
EXIT_USAGE = 2  # bad arguments or a bad config file


@dataclass
class CliContext:
    config_file: str | None
    _config: Config | None = field(default=None, init=False)

    def config(self) -> Config:
        """The validated config; a bad file ends the command with exit 2 and the reasons."""
        if self._config is None:
            try:
                self._config = load_config(self.config_file, missing_ok=self.config_file is None)
            except ConfigError as exc:
                click.echo(str(exc), err=True)
                raise SystemExit(EXIT_USAGE) from None
        return self._config


pass_cli = click.make_pass_decorator(CliContext)
