"""Mailbox users: the users file's format and what `postwarden users` refuses.

Dovecot reads the users file (Layout.users_file) as a passwd-file for both its passdb and
its userdb, one user a line:

    user@domain:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$salt$hash::::::userdb_quota_rule=*:storage=100M

The fields are user, password, uid, gid, gecos, home, shell and then space-separated extra
fields (Dovecot joins everything after the seventh colon again, so a colon inside an extra
field is kept). uid, gid and home come from the userdb's default_fields, so postwarden leaves
those fields empty. The one extra field postwarden writes is the per-user quota: with a
`userdb_` prefix it is a userdb field whether Dovecot reads the line for a passdb lookup
(the prefix marks it for the userdb) or for the userdb lookup (which drops the prefix).
A per-user quota replaces `mail.mailbox_quota_mb` for that user.

Lines postwarden did not write (comments, blank lines, fields set by hand) are kept as they
are. Everything here is pure; the file on disk is read and replaced by users_file.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from postwarden.appliance.aliases import AliasError, domain_of, normalize_address

# The strongest scheme Debian 12's Dovecot lists (`doveadm pw -l`); argon2-cffi's encoded
# `$argon2id$…` string is exactly what that scheme verifies (libsodium's format).
PASSWORD_SCHEME = "ARGON2ID"  # noqa: S105 (a scheme name, not a password)
# A prompt or one line of standard input: room for a passphrase, not for a file.
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
# Megabytes; Dovecot's quota_rule takes storage=NM.
MAX_QUOTA_MB = 16 * 1024 * 1024

QUOTA_FIELD = "userdb_quota_rule"
_QUOTA_RE = re.compile(r"^\*:storage=(\d+)M$")
# The seven fixed fields before the extra fields.
_FIXED_FIELDS = 7
# Characters that would end a field or a line of the passwd-file, or split extra fields.
_FORBIDDEN_IN_FIELD = re.compile(r"[:\s\x00]")


class UserError(ValueError):
    """A users command that must be refused; the message is the one line the operator sees."""


@dataclass(frozen=True, slots=True)
class MailboxUser:
    """One user line: the address, its `{SCHEME}hash`, its own quota (None: the default)."""

    address: str
    password: str
    quota_mb: int | None = None
    # uid, gid, gecos, home, shell as found (empty when postwarden wrote the line).
    passwd_fields: tuple[str, str, str, str, str] = ("", "", "", "", "")
    # Extra fields other than the quota, verbatim.
    other_fields: tuple[str, ...] = ()

    def line(self) -> str:
        """The passwd-file line, without the newline."""
        extra = list(self.other_fields)
        if self.quota_mb is not None:
            extra.insert(0, quota_field(self.quota_mb))
        return ":".join([self.address, self.password, *self.passwd_fields, " ".join(extra)])


@dataclass(frozen=True, slots=True)
class UsersFile:
    """The whole file in order: users, and the other lines (comments, blanks) as text."""

    lines: tuple[MailboxUser | str, ...] = ()

    def users(self) -> list[MailboxUser]:
        return [line for line in self.lines if isinstance(line, MailboxUser)]

    def find(self, address: str) -> MailboxUser | None:
        return next((u for u in self.users() if u.address == address), None)

    def with_user(self, user: MailboxUser) -> UsersFile:
        """A new user appended; UserError if the address is taken."""
        if self.find(user.address) is not None:
            raise UserError(f"{user.address} is already a mailbox user")
        return UsersFile((*self.lines, user))

    def replaced(self, address: str, change: Callable[[MailboxUser], MailboxUser]) -> UsersFile:
        """The user's line changed in place; UserError if there is no such user."""
        if self.find(address) is None:
            raise UserError(f"{address} is not a mailbox user")
        return UsersFile(
            tuple(
                change(line) if isinstance(line, MailboxUser) and line.address == address else line
                for line in self.lines
            )
        )

    def without(self, address: str) -> UsersFile:
        """The user's line dropped; UserError if there is no such user."""
        if self.find(address) is None:
            raise UserError(f"{address} is not a mailbox user")
        return UsersFile(
            tuple(
                line
                for line in self.lines
                if not (isinstance(line, MailboxUser) and line.address == address)
            )
        )


def quota_field(quota_mb: int) -> str:
    """The userdb extra field that gives one user `quota_mb` megabytes."""
    return f"{QUOTA_FIELD}=*:storage={quota_mb}M"


def parse_user_line(line: str) -> MailboxUser | str:
    """One line: a MailboxUser, or the line itself when Dovecot would not read a user there."""
    if not line.strip() or line.lstrip().startswith("#"):
        return line
    parts = line.split(":")
    if len(parts) < 2:
        return line
    fixed = (parts + [""] * _FIXED_FIELDS)[:_FIXED_FIELDS]
    extra = ":".join(parts[_FIXED_FIELDS:])
    quota: int | None = None
    others: list[str] = []
    for field_text in extra.split():
        key, _, value = field_text.partition("=")
        match = _QUOTA_RE.match(value)
        if key == QUOTA_FIELD and match and quota is None:
            quota = int(match.group(1))
        else:
            others.append(field_text)
    passwd = (fixed[2], fixed[3], fixed[4], fixed[5], fixed[6])
    return MailboxUser(fixed[0].lower(), fixed[1], quota, passwd, tuple(others))


def parse_users_file(text: str) -> UsersFile:
    """The users file's text, line by line (nothing in it is refused: Dovecot's file)."""
    # Split as Dovecot does, on newlines only (str.splitlines also splits on \x1c, \x85, …).
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return UsersFile(tuple(parse_user_line(line) for line in lines))


def format_users_file(users: UsersFile) -> str:
    """The text of the file, one line each, newline-terminated."""
    return "".join(
        (line.line() if isinstance(line, MailboxUser) else line) + "\n" for line in users.lines
    )


def mailbox_address(
    text: str,
    *,
    main_domain: str,
    local_domains: Sequence[str],
    gateway_domains: Iterable[str] = (),
) -> str:
    """A normalised `local@domain` that may have a mailbox here; UserError says why not.

    A bare local part gets the main domain, as in `postwarden aliases`.
    """
    try:
        address = normalize_address(text, main_domain)
    except AliasError as exc:
        raise UserError(str(exc)) from None
    local, _, domain = address.rpartition("@")
    if "/" in local or _FORBIDDEN_IN_FIELD.search(address):
        # The mailbox lives at mail_root/DOMAIN/LOCAL: a slash would name another directory.
        raise UserError(f"{address!r}: a mailbox name cannot hold '/', ':' or spaces")
    if domain in {d.lower() for d in gateway_domains}:
        raise UserError(
            f"{address}: {domain} is a gateway.domains domain; its mailboxes are the backend's"
        )
    ours = {d.lower() for d in local_domains} | {main_domain.lower()}
    if domain not in ours:
        raise UserError(
            f"{address}: {domain} is not one of our mailbox domains "
            f"(mail.main_domain / mail.additional_domains: {', '.join(sorted(ours))})"
        )
    return address


def check_not_alias(address: str, alias_targets: Sequence[str] | None) -> None:
    """Refuse a mailbox for an address that forwards elsewhere.

    The one alias a mailbox may have is the "copy" kind, whose targets include the address
    itself: its mail is delivered here and forwarded too.
    """
    if alias_targets is not None and address not in alias_targets:
        raise UserError(
            f"{address} is a forwarding alias (-> {', '.join(alias_targets)}); "
            f"remove it first (postwarden aliases remove {address})"
        )


def check_password(password: str) -> str:
    """The password as given, or UserError saying what is wrong with it."""
    if any(c in password for c in "\r\n\x00"):
        raise UserError("the password cannot hold a line break or a NUL character")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password is too short (at least {MIN_PASSWORD_LENGTH} characters)")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise UserError(f"the password is too long (at most {MAX_PASSWORD_LENGTH} characters)")
    return password


def password_from_stdin(text: str) -> str:
    """The password in one line of standard input (its line ending dropped)."""
    line, newline, rest = text.partition("\n")
    if newline and rest:
        raise UserError("standard input holds more than one line; give the password alone")
    return check_password(line.removesuffix("\r"))


def check_quota_mb(quota_mb: int) -> int:
    """A per-user quota in megabytes (at least 1), or UserError."""
    if not 1 <= quota_mb <= MAX_QUOTA_MB:
        raise UserError(f"quota {quota_mb} MB: give 1 to {MAX_QUOTA_MB} megabytes")
    return quota_mb


def hash_password(password: str, hasher: Callable[[str], str] | None = None) -> str:
    """`{ARGON2ID}$argon2id$…` for the users file (argon2-cffi's RFC 9106 low-memory profile)."""
    if hasher is None:
        from argon2 import PasswordHasher  # imported here: only add and passwd hash

        hasher = PasswordHasher().hash
    encoded = hasher(password)
    if not encoded.startswith("$argon2id$") or _FORBIDDEN_IN_FIELD.search(encoded):
        raise UserError("the password hasher returned something the users file cannot hold")
    return f"{{{PASSWORD_SCHEME}}}{encoded}"


def new_user(address: str, password_hash: str, quota_mb: int | None = None) -> MailboxUser:
    return MailboxUser(address, password_hash, quota_mb)


def with_password(password_hash: str) -> Callable[[MailboxUser], MailboxUser]:
    return lambda user: replace(user, password=password_hash)


def with_quota(quota_mb: int | None) -> Callable[[MailboxUser], MailboxUser]:
    return lambda user: replace(user, quota_mb=quota_mb)


def mailbox_dir(mail_root: Path, address: str) -> Path:
    """The user's home (mail_root/DOMAIN/LOCAL, as the userdb's default_fields say)."""
    local, _, domain = address.rpartition("@")
    return mail_root / domain / local


def effective_quota_mb(user: MailboxUser, default_mb: int) -> int | None:
    """The quota Dovecot applies, in megabytes; None: unlimited."""
    if user.quota_mb is not None:
        return user.quota_mb
    return default_mb or None


def describe(user: MailboxUser, default_mb: int, mail_root: Path) -> dict[str, object]:
    """What `users show` prints for one user (never the hash)."""
    scheme = user.password[1:].partition("}")[0] if user.password.startswith("{") else ""
    return {
        "address": user.address,
        "quota_mb": effective_quota_mb(user, default_mb),
        "quota_source": "user" if user.quota_mb is not None else "mail.mailbox_quota_mb",
        "password_scheme": scheme or "unknown",
        "mailbox": str(mailbox_dir(mail_root, user.address)),
        "domain": domain_of(user.address),
    }
