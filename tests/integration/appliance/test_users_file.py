"""The users file's lock and atomic replace (postwarden/appliance/users_file.py), on disk."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

from postwarden.appliance.users import UserError, UsersFile, new_user
from postwarden.appliance.users_file import read_users, update_users

HASH = "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"
# How long the first writer holds its change open, waiting for the second to finish: with the
# lock the second cannot finish in that time; without it, it would, and be overwritten.
HOLD_SECONDS = 3.0


def test_a_writer_waits_for_the_one_holding_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "users"
    first_inside = threading.Event()
    second_done = threading.Event()

    def slow_add(current: UsersFile) -> UsersFile:
        first_inside.set()
        second_done.wait(HOLD_SECONDS)
        return current.with_user(new_user("first@example.com", HASH))

    def second() -> None:
        first_inside.wait(HOLD_SECONDS)
        update_users(path, lambda current: current.with_user(new_user("second@example.com", HASH)))
        second_done.set()

    threads = [
        threading.Thread(target=update_users, args=(path, slow_add)),
        threading.Thread(target=second),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * HOLD_SECONDS)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(u.address for u in read_users(path).users()) == [
        "first@example.com",
        "second@example.com",
    ]


def test_a_refused_change_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("a@example.com:{PLAIN}x::::::\n")
    before = path.stat().st_ino

    def duplicate(current: UsersFile) -> UsersFile:
        return current.with_user(new_user("a@example.com", HASH))

    with pytest.raises(UserError, match="already a mailbox user"):
        update_users(path, duplicate)
    assert path.stat().st_ino == before
    assert path.read_text() == "a@example.com:{PLAIN}x::::::\n"


def test_each_version_has_an_mtime_second_of_its_own(tmp_path: Path) -> None:
    """Dovecot rereads the file only when its mtime second or its size changed: a new
    password (same length) written in the same second must still look changed."""
    path = tmp_path / "users"
    path.write_text("a@example.com:{PLAIN}x::::::\n")
    seconds = [path.stat().st_mtime_ns // 1_000_000_000]
    for digit in "123":

        def new_password(current: UsersFile, digit: str = digit) -> UsersFile:
            return current.replaced(
                "a@example.com", lambda u: replace(u, password="{PLAIN}" + digit)
            )

        update_users(path, new_password)
        seconds.append(path.stat().st_mtime_ns // 1_000_000_000)
    assert path.read_text() == "a@example.com:{PLAIN}3::::::\n"
    assert seconds == sorted(set(seconds)), seconds
