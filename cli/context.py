"""What every subcommand shares: the config file (loaded once, lazily) and error reporting."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import click

from postwarden.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from postwarden.store.base import Store

T = TypeVar("T")

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

    def with_store(self, work: Callable[[Store], Awaitable[T]]) -> T:
        """Run `work(store)` against the configured store and close it.

        A store failure ends the command with exit 1 and why; a URL the store cannot open
        with exit 2.
        """
        # Imported here: commands that never touch the store do not pay for the backends.
        from postwarden.store import open_store
        from postwarden.store.base import StoreError

        cfg = self.config()

        async def session() -> T:
            try:
                store = open_store(cfg.store.url, timeout=cfg.store.timeout)
            except ValueError as exc:  # a URL the config's scheme check let through
                click.echo(f"error: store: {exc}", err=True)
                raise SystemExit(EXIT_USAGE) from None
            try:
                return await work(store)
            finally:
                await store.close()

        try:
            return asyncio.run(session())
        except StoreError as exc:
            # Not the URL: a Redis URL may carry a password.
            click.echo(f"error: store: {exc}", err=True)
            raise SystemExit(EXIT_FAILURE) from None


pass_cli = click.make_pass_decorator(CliContext)
