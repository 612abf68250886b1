"""The users file's format and what `postwarden users` refuses (postwarden/appliance/users.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postwarden.appliance.users import (
    MailboxUser,
    UserError,
    UsersFile,
    check_not_alias,
    check_password,
    check_quota_mb,
    describe,
    format_users_file,
    hash_password,
    mailbox_address,
    mailbox_dir,
    new_user,
    parse_users_file,
    password_from_stdin,
    with_password,
    with_quota,
)

HASH = "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2g"
DOMAINS = {"main_domain": "example.com", "local_domains": ["example.com", "example.org"]}


def test_a_new_user_line_is_dovecots_passwd_file_shape() -> None:
    assert new_user("a@example.com", HASH).line() == f"a@example.com:{HASH}::::::"


def test_a_per_user_quota_is_a_userdb_extra_field_after_the_seventh_colon() -> None:
    line = new_user("a@example.com", HASH, 100).line()
    assert line == f"a@example.com:{HASH}::::::userdb_quota_rule=*:storage=100M"
    assert parse_users_file(line).users() == [new_user("a@example.com", HASH, 100)]


def test_hand_written_lines_and_fields_survive_a_round_trip() -> None:
    text = (
        "# mailbox users\n"
        "\n"
        "old@example.com:{SHA512-CRYPT}$6$x$y::::::\n"
        "odd@example.com:{PLAIN}pw:1000:1000::/srv/odd::userdb_mail=maildir:~/M nopassword\n"
    )
    users = parse_users_file(text)
    assert format_users_file(users) == text
    odd = users.find("odd@example.com")
    assert odd is not None
    assert odd.passwd_fields == ("1000", "1000", "", "/srv/odd", "")
    assert odd.other_fields == ("userdb_mail=maildir:~/M", "nopassword")
    changed = users.replaced("odd@example.com", with_quota(5))
    assert changed.find("odd@example.com") == MailboxUser(
        "odd@example.com",
        "{PLAIN}pw",
        5,
        ("1000", "1000", "", "/srv/odd", ""),
        ("userdb_mail=maildir:~/M", "nopassword"),
    )
    assert format_users_file(changed).splitlines()[:3] == text.splitlines()[:3]


def test_the_fixtures_plain_lines_parse_as_users() -> None:
    users = parse_users_file("alice@example.test:{PLAIN}alice-secret::::::\n")
    assert [u.address for u in users.users()] == ["alice@example.test"]


def test_add_refuses_a_duplicate_and_keeps_order() -> None:
    users = UsersFile().with_user(new_user("a@example.com", HASH))
    users = users.with_user(new_user("b@example.com", HASH))
    with pytest.raises(UserError, match="already a mailbox user"):
        users.with_user(new_user("a@example.com", HASH))
    assert [u.address for u in users.users()] == ["a@example.com", "b@example.com"]


def test_remove_passwd_and_quota_refuse_an_unknown_user() -> None:
    users = UsersFile().with_user(new_user("a@example.com", HASH))
    with pytest.raises(UserError, match="not a mailbox user"):
        users.without("b@example.com")
    with pytest.raises(UserError, match="not a mailbox user"):
        users.replaced("b@example.com", with_password(HASH))
    assert users.without("a@example.com").users() == []


def test_quota_zero_means_back_to_the_default() -> None:
    user = new_user("a@example.com", HASH, 50)
    back = with_quota(None)(user)
    assert back.line() == f"a@example.com:{HASH}::::::"
    assert describe(back, 1024, Path("/m"))["quota_mb"] == 1024
    assert describe(back, 0, Path("/m"))["quota_mb"] is None
    assert describe(user, 1024, Path("/m"))["quota_mb"] == 50


def test_show_never_prints_the_hash() -> None:
    row = describe(new_user("a@example.com", HASH, 7), 0, Path("/var/mail/vhosts"))
    assert HASH not in repr(row)
    assert row["password_scheme"] == "ARGON2ID"
    assert row["mailbox"] == "/var/mail/vhosts/example.com/a"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("J.Smith", "j.smith@example.com"),
        ("k@EXAMPLE.org", "k@example.org"),
    ],
)
def test_addresses_in_our_domains_are_normalised(text: str, expected: str) -> None:
    assert mailbox_address(text, **DOMAINS) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("x@other.net", "not one of our mailbox domains"),
        ("a/b@example.com", "cannot hold '/'"),
        ("a..b@example.com", "not a mail address"),
        ("@example.com", "not a mail address"),
        ("a b@example.com", "not a mail address"),
    ],
)
def test_addresses_that_cannot_have_a_mailbox_here_are_refused(text: str, why: str) -> None:
    with pytest.raises(UserError, match=why):
        mailbox_address(text, **DOMAINS)  # type: ignore[arg-type]


def test_a_gateway_domain_is_refused_as_the_backends() -> None:
    with pytest.raises(UserError, match=r"gateway\.domains domain; its mailboxes are the backend"):
        mailbox_address("u@corp.example", gateway_domains=["corp.example"], **DOMAINS)  # type: ignore[arg-type]


def test_an_alias_is_refused_unless_it_keeps_a_copy_here() -> None:
    with pytest.raises(UserError, match="is a forwarding alias"):
        check_not_alias("sales@example.com", ["j@example.com"])
    check_not_alias("r@example.com", ["j@example.com", "r@example.com"])  # the "copy" kind
    check_not_alias("r@example.com", None)


@pytest.mark.parametrize(
    ("stdin", "why"),
    [
        ("", "too short"),
        ("short\n", "too short"),
        ("first-line\nsecond-line\n", "more than one line"),
        ("nul\x00inside-it\n", "NUL"),
        ("x" * 2000, "too long"),
    ],
)
def test_bad_passwords_on_stdin_are_refused(stdin: str, why: str) -> None:
    with pytest.raises(UserError, match=why):
        password_from_stdin(stdin)


def test_one_line_of_stdin_is_the_password_without_its_line_ending() -> None:
    assert password_from_stdin("correct horse\r\n") == "correct horse"
    assert password_from_stdin("correct horse") == "correct horse"
    assert check_password(" spaces kept ") == " spaces kept "


def test_quota_bounds() -> None:
    assert check_quota_mb(1) == 1
    for bad in (0, -5, 10**12):
        with pytest.raises(UserError, match="quota"):
            check_quota_mb(bad)


def test_the_stored_hash_is_argon2id_and_verifies() -> None:
    from argon2 import PasswordHasher

    stored = hash_password("correct horse battery")
    assert stored.startswith("{ARGON2ID}$argon2id$")
    assert "correct horse" not in stored
    assert PasswordHasher().verify(stored.removeprefix("{ARGON2ID}"), "correct horse battery")
    assert hash_password("correct horse battery") != stored  # salted


def test_a_hasher_answer_the_file_cannot_hold_is_refused() -> None:
    with pytest.raises(UserError, match="cannot hold"):
        hash_password("password", hasher=lambda _: "$argon2id$a:b")
    with pytest.raises(UserError, match="cannot hold"):
        hash_password("password", hasher=lambda _: "plain")


def test_the_mailbox_is_where_the_userdb_puts_home() -> None:
    # dovecot.conf.tmpl: home=@{mail_root}/%d/%n
    assert mailbox_dir(Path("/var/mail/vhosts"), "j@example.org") == Path(
        "/var/mail/vhosts/example.org/j"
    )


_field = st.text(
    alphabet=st.characters(exclude_characters="\n", codec="utf-8"),
    max_size=20,
)


@given(
    address=st.from_regex(r"\A[a-z0-9.]{1,10}@example\.com\Z"),
    quota=st.none() | st.integers(min_value=1, max_value=10**6),
    others=st.lists(st.from_regex(r"\A[a-z_]{1,8}=[a-z0-9:/=]{0,8}\Z"), max_size=3),
)
def test_any_user_line_round_trips(address: str, quota: int | None, others: list[str]) -> None:
    user = MailboxUser(address, HASH, quota, ("", "", "", "", ""), tuple(others))
    again = parse_users_file(format_users_file(UsersFile((user,))))
    assert again.users() == [user]


@given(st.lists(_field, max_size=10))
def test_any_text_parses_and_keeps_its_non_user_lines(lines: list[str]) -> None:
    users = parse_users_file("\n".join(lines))
    for line in users.lines:
        assert isinstance(line, MailboxUser) or line in lines
