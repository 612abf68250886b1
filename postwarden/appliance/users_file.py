"""The users file on disk: read, change and replace it under a lock.

Every change takes an exclusive flock on `USERS.lock` beside the file, reads the file,
applies a pure change (postwarden/appliance/users.py) and writes the result to a temporary
file in the same directory (same mode and owner), which os.replace puts in place: two
commands at once both land, and Dovecot, which opens the file afresh when it changes,
reads the old file or the new one, never half of one. Dovecot looks at the file at most
once a second, so a change takes effect at logins from the next second on.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from postwarden.appliance.users import UsersFile, format_users_file, parse_users_file

# What install.sh creates the file with (root:dovecot 0640): Dovecot reads it, nobody else.
NEW_FILE_MODE = 0o640


class UsersFileError(OSError):
    """The users file cannot be read or replaced; the message names the path."""


def lock_path(users_file: Path) -> Path:
    return users_file.with_name(users_file.name + ".lock")


@contextlib.contextmanager
def locked(users_file: Path) -> Iterator[None]:
    """Hold the exclusive lock beside `users_file` (blocking until other writers are done)."""
    try:
        fd = os.open(lock_path(users_file), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UsersFileError(f"cannot open the lock {lock_path(users_file)}: {exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_users(users_file: Path) -> UsersFile:
    """The file as it is now (a missing file: no users)."""
    try:
        return parse_users_file(users_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return UsersFile()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"cannot read {users_file}: {exc}") from None


def replace_atomically(users_file: Path, text: str) -> None:
    """Put `text` in place of the file in one rename, keeping its mode and owner."""
    try:
        st: os.stat_result | None = users_file.stat()
    except FileNotFoundError:
        st = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{users_file.name}.", dir=users_file.parent)
    except OSError as exc:
        raise UsersFileError(f"cannot write beside {users_file}: {exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            os.fchmod(tmp.fileno(), (st.st_mode & 0o7777) if st else NEW_FILE_MODE)
            if st is not None and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(tmp.fileno(), st.st_uid, st.st_gid)
            tmp.write(text)
            tmp.flush()
            if st is not None:
                os.utime(tmp.fileno(), ns=_next_stamp_ns(st))
            os.fsync(tmp.fileno())
        os.replace(tmp_name, users_file)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise UsersFileError(f"cannot write {users_file}: {exc}") from None
    # The rename itself survives a power loss only once the directory is on disk.
    dir_fd = os.open(users_file.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _next_stamp_ns(old: os.stat_result) -> tuple[int, int]:
    """atime and mtime for the new file: later than the old one's mtime in whole seconds.

    Dovecot's passwd-file rereads the file when its mtime (in seconds) or its size differs
    from what it last loaded; a change in the same second to the same size (a new password
    hash) would go unseen. So every version's mtime is a second of its own.
    """
    now = time.time_ns()
    old_second = old.st_mtime_ns // 1_000_000_000
    stamp = max(now, (old_second + 1) * 1_000_000_000)
    return stamp, stamp


def update_users(users_file: Path, change: Callable[[UsersFile], UsersFile]) -> UsersFile:
    """Apply `change` to the file under the lock and write the result; returns it.

    `change` may raise (users.UserError): then nothing is written.
    """
    with locked(users_file):
        updated = change(read_users(users_file))
        replace_atomically(users_file, format_users_file(updated))
        return updated
