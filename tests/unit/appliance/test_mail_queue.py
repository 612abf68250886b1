"""Parsing `postqueue -j` output and building postqueue/postsuper command lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from postwarden.appliance.mail_queue import (
    QueuedMessage,
    QueuedRecipient,
    QueueError,
    delete_argv,
    deleted_count,
    format_message,
    list_argv,
    parse_queue,
    resend_argv,
    select,
)

# Captured from Postfix 3.7.11 (Debian 12): one deferred message (relay unreachable) and
# one active message with two recipients, one of them not yet tried.
CAPTURE = (
    '{"queue_name": "deferred", "queue_id": "A776E20C85A", "arrival_time": 1795573699, '
    '"message_size": 376, "forced_expire": false, "sender": "alice@example.test", '
    '"recipients": [{"address": "someone@outside.test", "delay_reason": "connect to '
    '127.0.0.1[127.0.0.1]:35973: Connection refused"}]}\n'
    '{"queue_name": "active", "queue_id": "4XQk2b0Qz5z9vBq", "arrival_time": 1795573700, '
    '"message_size": 1024, "forced_expire": false, "sender": "", '
    '"recipients": [{"address": "a@outside.test", "delay_reason": "host mx.outside.test said: '
    '451 4.7.1 Greylisted"}, {"address": "b@outside.test"}]}\n'
)


def test_parses_captured_queue() -> None:
    deferred, active = parse_queue(CAPTURE)
    assert deferred == QueuedMessage(
        queue_name="deferred",
        queue_id="A776E20C85A",
        arrival_time=1795573699,
        message_size=376,
        sender="alice@example.test",
        recipients=(
            QueuedRecipient(
                "someone@outside.test",
                "connect to 127.0.0.1[127.0.0.1]:35973: Connection refused",
            ),
        ),
    )
    assert active.sender == ""
    assert active.recipients[1] == QueuedRecipient("b@outside.test", "")
    assert active.reasons == ["host mx.outside.test said: 451 4.7.1 Greylisted"]


def test_empty_queue_prints_nothing() -> None:
    assert parse_queue("") == []
    assert parse_queue("\n") == []


def test_select_by_queue_name() -> None:
    assert [m.queue_id for m in select(parse_queue(CAPTURE), "deferred")] == ["A776E20C85A"]
    assert len(select(parse_queue(CAPTURE), None)) == 2


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"queue_name": "deferred"}', "'recipients' missing"),
        ('{"recipients": [{"delay_reason": "x"}]}', "without an address"),
        (
            '{"queue_name": "d", "queue_id": "ABCDE", "arrival_time": true, "message_size": 1,'
            ' "sender": "", "recipients": []}',
            "'arrival_time' missing or not int",
        ),
    ],
)
def test_malformed_lines_are_named(line: str, why: str) -> None:
    with pytest.raises(QueueError, match=why):
        parse_queue(CAPTURE + line)


def test_json_form_round_trips_the_fields() -> None:
    deferred = parse_queue(CAPTURE)[0]
    assert deferred.as_json()["recipients"] == [
        {
            "address": "someone@outside.test",
            "delay_reason": "connect to 127.0.0.1[127.0.0.1]:35973: Connection refused",
        }
    ]


def test_list_lines_show_each_reason() -> None:
    lines = format_message(parse_queue(CAPTURE)[0])
    assert lines[0].startswith("A776E20C85A  deferred")
    assert "from <alice@example.test>" in lines[0]
    assert lines[1:] == [
        "    to <someone@outside.test>",
        "       (connect to 127.0.0.1[127.0.0.1]:35973: Connection refused)",
    ]


def test_command_lines() -> None:
    conf = Path("/tmp/pf")
    assert list_argv(None) == ["postqueue", "-j"]
    assert list_argv(conf) == ["postqueue", "-c", "/tmp/pf", "-j"]
    assert resend_argv(conf, "A776E20C85A") == ["postqueue", "-c", "/tmp/pf", "-i", "A776E20C85A"]
    assert resend_argv(None, None) == ["postqueue", "-f"]
    assert delete_argv(None, "A776E20C85A") == ["postsuper", "-d", "A776E20C85A"]
    assert delete_argv(conf, None) == ["postsuper", "-c", "/tmp/pf", "-d", "ALL"]


@pytest.mark.parametrize("bad", ["ALL", "-x", "", "A776E20C85A; rm", "../x", "ab"])
def test_queue_ids_that_postsuper_would_misread_are_refused(bad: str) -> None:
    # "ALL" would delete everything; "-x" would be an option.
    with pytest.raises(QueueError):
        delete_argv(None, bad)
    with pytest.raises(QueueError):
        resend_argv(None, bad)


def test_deleted_count() -> None:
    assert deleted_count("postsuper: A776E20C85A: removed\npostsuper: Deleted: 1 message\n") == 1
    assert deleted_count("postsuper: Deleted: 12 messages\n") == 12
    assert deleted_count("") == 0
