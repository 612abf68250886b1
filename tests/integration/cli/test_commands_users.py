"""`postwarden users` against temp files: the users file, its lock, and the alias store."""

from __future__ import annotations

import grp
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from cli.main import cli

# Each `users add` is a process of its own (two at a time): enough to interleave their
# read-modify-write cycles many times, bounded in count and (by the timeout) in time.
CONCURRENT_ADDS = 20
PROCESS_TIMEOUT = 60.0
PROMPT_TIMEOUT = 30.0


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "postwarden.toml"
    path.write_text(
        f'[store]\nurl = "sqlite://{tmp_path}/state.db"\n\n'
        '[mail]\nmain_domain = "example.com"\nadditional_domains = ["example.org"]\n'
        "mailbox_quota_mb = 1024\n"
    )
    return path


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "users"


@pytest.fixture
def mail_root(tmp_path: Path) -> Path:
    return tmp_path / "mail"


class Users:
    def __init__(self, config_file: Path, users_file: Path, mail_root: Path) -> None:
        self.config_file = config_file
        self.users_file = users_file
        self.mail_root = mail_root
        users_file.parent.mkdir(exist_ok=True)

    def __call__(self, command: str, *args: str, stdin: str | None = None) -> Result:
        paths = ["--users-file", str(self.users_file), "--mail-root", str(self.mail_root)]
        return CliRunner().invoke(
            cli, ["--config", str(self.config_file), "users", command, *args, *paths], input=stdin
        )

    def alias(self, *args: str) -> Result:
        return CliRunner().invoke(cli, ["--config", str(self.config_file), "aliases", *args])

    def shown(self) -> list[dict[str, object]]:
        result = self("show", "--json")
        assert result.exit_code == 0, result.output
        rows: list[dict[str, object]] = json.loads(result.stdout)
        return rows

    def hash_of(self, address: str) -> str:
        for line in self.users_file.read_text().splitlines():
            if line.startswith(f"{address}:"):
                return line.split(":")[1]
        raise AssertionError(f"{address} not in {self.users_file}")


@pytest.fixture
def users(config_file: Path, users_file: Path, mail_root: Path) -> Users:
    return Users(config_file, users_file, mail_root)


def test_add_stores_only_an_argon2id_hash_of_the_password_from_stdin(users: Users) -> None:
    added = users("add", "j.smith", stdin="correct horse battery\n")
    assert added.exit_code == 0, added.output
    assert "added j.smith@example.com" in added.output
    text = users.users_file.read_text()
    assert "correct horse" not in text
    stored = users.hash_of("j.smith@example.com")
    assert stored.startswith("{ARGON2ID}$argon2id$")
    assert PasswordHasher().verify(stored.removeprefix("{ARGON2ID}"), "correct horse battery")
    assert text.endswith("::::::\n")


def test_the_password_is_never_an_argument(users: Users) -> None:
    result = users("add", "j.smith", "--password", "correct horse battery")
    assert result.exit_code == 2
    assert "No such option" in result.output
    assert not users.users_file.exists()


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("add", "x@other.net"), "long-enough-pw\n", "not one of our mailbox domains"),
        (("add", "j.smith"), "short\n", "too short"),
        (("add", "j.smith", "--quota", "-1"), "long-enough-pw\n", "quota -1 MB"),
        (("remove", "ghost"), None, "ghost@example.com is not a mailbox user"),
        (("passwd", "ghost"), "long-enough-pw\n", "ghost@example.com is not a mailbox user"),
        (("quota", "ghost", "5"), None, "ghost@example.com is not a mailbox user"),
    ],
)
def test_refusals_are_one_line_and_exit_2(
    users: Users, args: tuple[str, ...], stdin: str | None, message: str
) -> None:
    result = users(*args, stdin=stdin)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_duplicate_is_refused_and_the_first_password_kept(users: Users) -> None:
    assert users("add", "j.smith", stdin="first-password\n").exit_code == 0
    before = users.hash_of("j.smith@example.com")
    again = users("add", "J.Smith@Example.com", stdin="second-password\n")
    assert again.exit_code == 2
    assert again.stderr == "users add: j.smith@example.com is already a mailbox user\n"
    assert users.hash_of("j.smith@example.com") == before


def test_a_gateway_domain_is_refused(users: Users, tmp_path: Path) -> None:
    users.config_file.write_text(
        users.config_file.read_text() + '\n[gateway]\nenabled = true\ndomains = ["corp.example"]\n'
        f'ca = "{tmp_path}/backend-ca.pem"\n'
        '[gateway.smtp]\nhost = "backend.corp.example"\n'
    )
    result = users("add", "u@corp.example", stdin="long-enough-pw\n")
    assert result.exit_code == 2, result.output
    assert "gateway.domains domain; its mailboxes are the backend's" in result.stderr


def test_an_alias_is_refused_but_a_copy_alias_may_have_its_mailbox(users: Users) -> None:
    assert users.alias("add", "sales", "j.smith").exit_code == 0
    refused = users("add", "sales", stdin="long-enough-pw\n")
    assert refused.exit_code == 2
    assert refused.stderr == (
        "users add: sales@example.com is a forwarding alias (-> j.smith@example.com); "
        "remove it first (postwarden aliases remove sales@example.com)\n"
    )
    assert users.alias("add", "r.johnson", "j.smith", "r.johnson").exit_code == 0
    assert users("add", "r.johnson", stdin="long-enough-pw\n").exit_code == 0
    assert [row["address"] for row in users.shown()] == ["r.johnson@example.com"]


def test_quota_overrides_the_default_and_zero_goes_back(users: Users) -> None:
    assert users("add", "a", "--quota", "50", stdin="long-enough-pw\n").exit_code == 0
    assert users("add", "b@example.org", stdin="long-enough-pw\n").exit_code == 0
    rows = {row["address"]: row for row in users.shown()}
    assert rows["a@example.com"]["quota_mb"] == 50
    assert rows["b@example.org"]["quota_mb"] == 1024
    assert rows["b@example.org"]["quota_source"] == "mail.mailbox_quota_mb"
    assert "userdb_quota_rule=*:storage=50M" in users.users_file.read_text()

    assert users("quota", "b@example.org", "7").exit_code == 0
    assert "b@example.org:" in users.users_file.read_text()
    assert users.shown()[1]["quota_mb"] == 7
    back = users("quota", "a", "0")
    assert back.exit_code == 0
    assert "back to mail.mailbox_quota_mb (1024 MB)" in back.output
    assert users.shown()[0]["quota_mb"] == 1024
    assert "storage=50M" not in users.users_file.read_text()


def test_passwd_replaces_the_hash(users: Users) -> None:
    assert users("add", "a", stdin="old-password\n").exit_code == 0
    assert users("passwd", "a", stdin="new-password\n").exit_code == 0
    stored = users.hash_of("a@example.com").removeprefix("{ARGON2ID}")
    assert PasswordHasher().verify(stored, "new-password")


def test_remove_keeps_the_mailbox_unless_told_to_delete_it(users: Users) -> None:
    for name in ("a", "b"):
        assert users("add", name, stdin="long-enough-pw\n").exit_code == 0
        maildir = users.mail_root / "example.com" / name / "Maildir" / "cur"
        maildir.mkdir(parents=True)
        (maildir / "1.mail").write_text("Subject: kept?\n\nbody\n")

    kept = users("remove", "a")
    assert kept.exit_code == 0
    assert kept.output == (
        f"removed a@example.com; its mailbox is kept at {users.mail_root}/example.com/a\n"
    )
    assert (users.mail_root / "example.com" / "a" / "Maildir" / "cur" / "1.mail").exists()

    deleted = users("remove", "b", "--delete-mail")
    assert deleted.exit_code == 0
    assert "deleted its mailbox" in deleted.output
    assert not (users.mail_root / "example.com" / "b").exists()
    assert (users.mail_root / "example.com" / "a").exists()
    assert users.shown() == []


def test_show_lists_users_without_their_hashes(users: Users) -> None:
    assert users("add", "a", stdin="long-enough-pw\n").exit_code == 0
    text = users("show")
    assert text.exit_code == 0
    assert text.output == (
        f"a@example.com  quota 1024 MB (default)  mailbox {users.mail_root}/example.com/a\n"
    )
    assert "argon2" not in users("show", "--json").output
    missing = users("show", "nobody")
    assert missing.exit_code == 1
    assert "nobody@example.com is not a mailbox user" in missing.stderr


def test_the_file_is_replaced_with_its_mode_and_owner_kept(users: Users) -> None:
    users.users_file.write_text("# hand-written note\nold@example.com:{PLAIN}x::::::\n")
    gid = grp.getgrnam("nogroup").gr_gid if os.geteuid() == 0 else os.getegid()
    os.chown(users.users_file, -1, gid)
    users.users_file.chmod(0o640)
    before = users.users_file.stat()

    assert users("add", "a", stdin="long-enough-pw\n").exit_code == 0
    after = users.users_file.stat()
    # A new inode: Dovecot, which opens the file afresh, sees the old one or the new one.
    assert after.st_ino != before.st_ino
    assert (after.st_mode & 0o7777, after.st_uid, after.st_gid) == (0o640, before.st_uid, gid)
    assert users.users_file.read_text().startswith(
        "# hand-written note\nold@example.com:{PLAIN}x::::::\na@example.com:{ARGON2ID}"
    )
    # Nothing else left beside it but the lock.
    assert sorted(p.name for p in users.users_file.parent.iterdir()) == ["users", "users.lock"]


def _add_in_a_process(users: Users, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "--config",
            str(users.config_file),
            "users",
            "add",
            address,
            "--users-file",
            str(users.users_file),
        ],
        input="long-enough-pw\n",
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )


def test_two_writers_at_once_lose_nothing(users: Users) -> None:
    def writer(prefix: str) -> list[int]:
        return [
            _add_in_a_process(users, f"{prefix}{i}@example.com").returncode
            for i in range(CONCURRENT_ADDS)
        ]

    with ThreadPoolExecutor(max_workers=2) as pool:
        left, right = pool.submit(writer, "left"), pool.submit(writer, "right")
        codes = [*left.result(), *right.result()]
    assert codes == [0] * (2 * CONCURRENT_ADDS)
    expected = {f"{p}{i}@example.com" for p in ("left", "right") for i in range(CONCURRENT_ADDS)}
    assert {row["address"] for row in users.shown()} == expected


def test_a_terminal_is_asked_twice_and_a_mismatch_asked_again(users: Users) -> None:
    argv = [
        sys.executable,
        "-m",
        "cli",
        "--config",
        str(users.config_file),
        "users",
        "add",
        "t@example.com",
        "--users-file",
        str(users.users_file),
    ]
    pid, fd = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        os.execv(argv[0], argv)  # noqa: S606 (fixed argv: this interpreter, no shell)
    transcript = b""
    exchanges = [
        (b"New password: ", b"first-password"),
        (b"Repeat for confirmation: ", b"other-password"),
        (b"New password: ", b"tty-password"),
        (b"Repeat for confirmation: ", b"tty-password"),
    ]
    try:
        for prompt, answer in exchanges:
            transcript = _read_until(fd, prompt, transcript)
            os.write(fd, answer + b"\n")
        transcript = _read_until(fd, b"added t@example.com", transcript)
    finally:
        status = _wait_child(pid)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, transcript
    assert b"do not match" in transcript
    assert b"tty-password" not in transcript  # not echoed
    stored = users.hash_of("t@example.com").removeprefix("{ARGON2ID}")
    assert PasswordHasher().verify(stored, "tty-password")


def _wait_child(pid: int) -> int:
    """The child's wait status; a child still running after PROMPT_TIMEOUT is killed."""
    deadline = time.monotonic() + PROMPT_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)  # our own child, stuck at a prompt
    return os.waitpid(pid, 0)[1]


def _read_until(fd: int, marker: bytes, transcript: bytes) -> bytes:
    """Read the pty until `marker` appears after what was already read; bounded in time."""
    start = len(transcript)
    deadline = time.monotonic() + PROMPT_TIMEOUT
    while marker not in transcript[start:]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"{marker!r} never came: {transcript!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                pytest.fail(f"{marker!r} never came: {transcript!r}")
            transcript += chunk
    return transcript
