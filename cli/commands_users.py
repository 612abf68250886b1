"""`postwarden users add|remove|passwd|show|quota`: the mailbox users Dovecot logs in.

The password comes from a prompt (asked twice) when standard input is a terminal, else from
one line of standard input; never from the command line, where `ps` and shell history
would show it. Changes take effect at the next login: Dovecot rereads the users file.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import click

from cli.context import EXIT_FAILURE, EXIT_USAGE, CliContext, pass_cli

if TYPE_CHECKING:
    from postwarden.appliance.users import UsersFile
    from postwarden.store.base import Store

F = TypeVar("F", bound=Callable[..., object])


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(message, err=True)
    raise SystemExit(code)


def _paths(command: F) -> F:
    """--users-file and --mail-root: the instance's paths (default: the appliance's)."""
    command = click.option(
        "--mail-root",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where mailboxes live (DOMAIN/LOCAL under it); default /var/mail/vhosts.",
    )(command)
    return click.option(
        "--users-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Dovecot's passwd-file of users; default /etc/postwarden/users.",
    )(command)


def _layout_paths(users_file: Path | None, mail_root: Path | None) -> tuple[Path, Path]:
    from postwarden.appliance.render import Layout

    layout = Layout.debian()
    return users_file or layout.users_file, mail_root or layout.mail_root


def _address(cli_ctx: CliContext, command: str, text: str) -> str:
    from postwarden.appliance.users import UserError, mailbox_address

    mail = cli_ctx.config().mail
    gateway = cli_ctx.config().gateway
    try:
        return mailbox_address(
            text,
            main_domain=mail.main_domain,
            local_domains=mail.local_domains,
            gateway_domains=gateway.domains if gateway.enabled else (),
        )
    except UserError as exc:
        _fail(f"users {command}: {exc}")


def _read_password(command: str) -> str:
    """The new password: prompted twice on a terminal, else one line of standard input."""
    from postwarden.appliance.users import UserError, check_password, password_from_stdin

    try:
        if sys.stdin.isatty():
            value: str = click.prompt(
                "New password", hide_input=True, confirmation_prompt=True, err=True
            )
            return check_password(value)
        return password_from_stdin(sys.stdin.read(64 * 1024))
    except UserError as exc:
        _fail(f"users {command}: {exc}")


def _hash(command: str, password: str) -> str:
    from postwarden.appliance.users import UserError, hash_password

    try:
        return hash_password(password)
    except UserError as exc:
        _fail(f"users {command}: {exc}", EXIT_FAILURE)


def _update(command: str, users_file: Path, change: Callable[[UsersFile], UsersFile]) -> None:
    from postwarden.appliance.users import UserError
    from postwarden.appliance.users_file import UsersFileError, update_users

    try:
        update_users(users_file, change)
    except UserError as exc:
        _fail(f"users {command}: {exc}")
    except UsersFileError as exc:
        _fail(f"users {command}: {exc}", EXIT_FAILURE)


@click.group("users")
def users() -> None:
    """Mailbox users (Dovecot's users file): add, remove, passwd, show, quota."""


@users.command("add")
@click.argument("address")
@click.option(
    "--quota",
    "quota_mb",
    type=int,
    default=None,
    help="This user's quota in MB (default: mail.mailbox_quota_mb).",
)
@_paths
@pass_cli
def users_add(
    cli_ctx: CliContext,
    address: str,
    quota_mb: int | None,
    users_file: Path | None,
    mail_root: Path | None,
) -> None:
    """Add a mailbox user; the password is prompted for, or read from standard input.

    \b
      postwarden users add j.smith                       (prompts twice)
      printf '%s\\n' "$PASSWORD" | postwarden users add j.smith@example.org --quota 500
    """
    from postwarden.appliance.users import (
        UserError,
        check_not_alias,
        check_quota_mb,
        mailbox_dir,
        new_user,
    )

    path, root = _layout_paths(users_file, mail_root)
    addr = _address(cli_ctx, "add", address)
    try:
        if quota_mb is not None:
            check_quota_mb(quota_mb)
    except UserError as exc:
        _fail(f"users add: {exc}")

    async def alias_of(store: Store) -> list[str] | None:
        targets = await store.get_alias(addr)
        return None if targets is None else list(targets)

    try:
        check_not_alias(addr, cli_ctx.with_store(alias_of))
    except UserError as exc:
        _fail(f"users add: {exc}")
    password_hash = _hash("add", _read_password("add"))

    def add(current: UsersFile) -> UsersFile:
        return current.with_user(new_user(addr, password_hash, quota_mb))

    _update("add", path, add)
    quota = f"{quota_mb} MB" if quota_mb is not None else "the default"
    click.echo(f"added {addr} (quota: {quota}; mailbox {mailbox_dir(root, addr)})")


@users.command("remove")
@click.argument("address")
@click.option("--delete-mail", is_flag=True, help="Also delete the mailbox and all its mail.")
@_paths
@pass_cli
def users_remove(
    cli_ctx: CliContext,
    address: str,
    delete_mail: bool,
    users_file: Path | None,
    mail_root: Path | None,
) -> None:
    """Remove a mailbox user; its mail is kept (path printed) unless --delete-mail."""
    from postwarden.appliance.users import mailbox_dir

    path, root = _layout_paths(users_file, mail_root)
    addr = _address(cli_ctx, "remove", address)

    def remove(current: UsersFile) -> UsersFile:
        return current.without(addr)

    _update("remove", path, remove)
    mailbox = mailbox_dir(root, addr)
    if not delete_mail:
        click.echo(f"removed {addr}; its mailbox is kept at {mailbox}")
        return
    if not mailbox.exists():
        click.echo(f"removed {addr}; it had no mailbox at {mailbox}")
        return
    try:
        shutil.rmtree(mailbox)
    except OSError as exc:
        _fail(f"users remove: removed {addr}, but its mailbox {mailbox}: {exc}", EXIT_FAILURE)
    click.echo(f"removed {addr} and deleted its mailbox {mailbox}")


@users.command("passwd")
@click.argument("address")
@_paths
@pass_cli
def users_passwd(
    cli_ctx: CliContext, address: str, users_file: Path | None, mail_root: Path | None
) -> None:
    """Set a new password (prompted for, or read from standard input)."""
    from postwarden.appliance.users import with_password

    path, _ = _layout_paths(users_file, mail_root)
    addr = _address(cli_ctx, "passwd", address)
    # Known before the prompt: no password typed for a user that is not there.
    _require_user("passwd", path, addr)
    password_hash = _hash("passwd", _read_password("passwd"))

    def change(current: UsersFile) -> UsersFile:
        return current.replaced(addr, with_password(password_hash))

    _update("passwd", path, change)
    click.echo(f"changed the password of {addr}")


@users.command("quota")
@click.argument("address")
@click.argument("quota_mb", metavar="MB", type=int)
@_paths
@pass_cli
def users_quota(
    cli_ctx: CliContext,
    address: str,
    quota_mb: int,
    users_file: Path | None,
    mail_root: Path | None,
) -> None:
    """Set a user's quota in MB; 0 goes back to the default (mail.mailbox_quota_mb)."""
    from postwarden.appliance.users import UserError, check_quota_mb, with_quota

    path, _ = _layout_paths(users_file, mail_root)
    addr = _address(cli_ctx, "quota", address)
    try:
        own = None if quota_mb == 0 else check_quota_mb(quota_mb)
    except UserError as exc:
        _fail(f"users quota: {exc}")

    def change(current: UsersFile) -> UsersFile:
        return current.replaced(addr, with_quota(own))

    _update("quota", path, change)
    default = cli_ctx.config().mail.mailbox_quota_mb
    if own is not None:
        click.echo(f"{addr}: quota {own} MB")
    else:
        click.echo(
            f"{addr}: quota back to mail.mailbox_quota_mb "
            f"({f'{default} MB' if default else 'unlimited'})"
        )


@users.command("show")
@click.argument("address", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@_paths
@pass_cli
def users_show(
    cli_ctx: CliContext,
    address: str | None,
    as_json: bool,
    users_file: Path | None,
    mail_root: Path | None,
) -> None:
    """Show every mailbox user, or ADDRESS (exit 1 if there is no such user)."""
    from postwarden.appliance.users import describe
    from postwarden.appliance.users_file import UsersFileError, read_users

    path, root = _layout_paths(users_file, mail_root)
    addr = _address(cli_ctx, "show", address) if address is not None else None
    try:
        current = read_users(path)
    except UsersFileError as exc:
        _fail(f"users show: {exc}", EXIT_FAILURE)
    found = [u for u in current.users() if addr is None or u.address == addr]
    if addr is not None and not found:
        _fail(f"users show: {addr} is not a mailbox user", EXIT_FAILURE)
    default = cli_ctx.config().mail.mailbox_quota_mb
    rows = [describe(u, default, root) for u in sorted(found, key=lambda u: u.address)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        quota = f"{row['quota_mb']} MB" if row["quota_mb"] is not None else "unlimited"
        source = "" if row["quota_source"] == "user" else " (default)"
        click.echo(f"{row['address']}  quota {quota}{source}  mailbox {row['mailbox']}")


def _require_user(command: str, users_file: Path, address: str) -> None:
    from postwarden.appliance.users_file import UsersFileError, read_users

    try:
        known = read_users(users_file).find(address) is not None
    except UsersFileError as exc:
        _fail(f"users {command}: {exc}", EXIT_FAILURE)
    if not known:
        _fail(f"users {command}: {address} is not a mailbox user")


COMMANDS = [users]
