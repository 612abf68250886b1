"""`postwarden queue` against a private Postfix whose outbound relay is unreachable."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tests.fixtures.mail_system import MailSystem, MailSystemFactory, free_port
from tests.fixtures.policyd_daemon import POSTWARDEN

DEFER_TIMEOUT = 20.0


def postwarden(system: MailSystem, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSTWARDEN, *args, "--postfix-config", str(system.layout.postfix_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def listed(system: MailSystem) -> list[dict[str, Any]]:
    done = postwarden(system, "queue", "list", "--json")
    assert done.returncode == 0, done.stderr
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


def wait_deferred(system: MailSystem, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + DEFER_TIMEOUT
    while time.monotonic() < deadline:
        messages = [m for m in listed(system) if m["queue_name"] == "deferred"]
        if len(messages) >= count and all(
            r["delay_reason"] for m in messages for r in m["recipients"]
        ):
            return messages
        time.sleep(0.2)
    raise AssertionError(f"no {count} deferred messages: {system.queue()}\n{system.logs()}")


def deferrals(system: MailSystem, queue_id: str) -> int:
    """How many delivery attempts of `queue_id` Postfix has logged as deferred."""
    return sum(
        1
        for line in system.postfix_log.splitlines()
        if f" {queue_id}: to=<" in line and "status=deferred" in line
    )


def wait_for(condition: Callable[[], bool], what: str, system: MailSystem) -> None:
    deadline = time.monotonic() + DEFER_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}\n{system.logs()}")


def start_with_dead_relay(factory: MailSystemFactory) -> MailSystem:
    # Nothing listens on this port: every outgoing message is deferred with "Connection refused".
    dead = free_port()
    return factory(
        {
            "mail": {
                "relays": [
                    {"name": "dead", "host": "127.0.0.1", "port": dead, "starttls": "disabled"}
                ]
            }
        }
    )


def test_deferred_message_listed_with_reason_resent_and_deleted(
    mail_system_factory: MailSystemFactory,
) -> None:
    system = start_with_dead_relay(mail_system_factory)
    assert system.smtp_send("alice@example.test", "someone@outside.test").accepted
    (message,) = wait_deferred(system, 1)
    queue_id = message["queue_id"]
    assert message["sender"] == "alice@example.test"
    assert message["recipients"][0]["address"] == "someone@outside.test"
    assert "Connection refused" in message["recipients"][0]["delay_reason"]

    text = postwarden(system, "queue", "list")
    assert text.returncode == 0
    assert queue_id in text.stdout
    assert "Connection refused" in text.stdout

    # Postfix's own retry is minutes away (minimal_backoff_time), so a second delivery
    # attempt within the test is the resend's doing.
    assert deferrals(system, queue_id) == 1
    resent = postwarden(system, "queue", "resend", queue_id)
    assert resent.returncode == 0, resent.stderr
    wait_for(lambda: deferrals(system, queue_id) == 2, f"no second attempt for {queue_id}", system)
    (again,) = wait_deferred(system, 1)
    assert again["queue_id"] == queue_id

    deleted = postwarden(system, "queue", "delete", queue_id)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted 1 message" in deleted.stdout
    assert listed(system) == []
    for action in ("delete", "resend"):
        missing = postwarden(system, "queue", action, queue_id)
        assert missing.returncode == 1, (action, missing.stdout)
        assert f"no message {queue_id} in the queue" in missing.stderr


def test_delete_all_and_flush(mail_system_factory: MailSystemFactory) -> None:
    system = start_with_dead_relay(mail_system_factory)
    for n in range(2):
        assert system.smtp_send("alice@example.test", f"user{n}@outside.test").accepted
    ids = [m["queue_id"] for m in wait_deferred(system, 2)]
    # Each makes Postfix try every deferred message once more, now (not in minutes).
    for attempts, action in ((2, ("flush",)), (3, ("resend", "--all"))):
        done = postwarden(system, "queue", *action)
        assert done.returncode == 0, done.stderr

        def retried(n: int = attempts) -> bool:
            return all(deferrals(system, i) == n for i in ids)

        wait_for(retried, f"queue {' '.join(action)}: not every message retried", system)
    deleted = postwarden(system, "queue", "delete", "--all")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted 2 messages" in deleted.stdout
    assert listed(system) == []
    assert "queue is empty" in postwarden(system, "queue", "list").stdout


def test_bad_queue_id_and_missing_choice_are_usage_errors(
    mail_system_factory: MailSystemFactory,
) -> None:
    system = start_with_dead_relay(mail_system_factory)
    assert postwarden(system, "queue", "delete", "-x").returncode == 2
    assert postwarden(system, "queue", "delete", "ALL").returncode == 2
    assert postwarden(system, "queue", "resend").returncode == 2
