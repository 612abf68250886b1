"""Postfix's mail queue as values: parsing `postqueue -j` and the commands that act on it.

`postqueue -j` prints one JSON object per queued message (postqueue(1), "JSON object
members"). Parsing is pure so it is tested on captured output; running the commands is the
CLI's job. Every command takes the Postfix config directory (`-c DIR`), so the same code
drives the system instance and a private test instance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Short (hex) and long (base-52-ish, enable_long_queue_ids) queue ids; never an option.
_QUEUE_ID_RE = re.compile(r"^[0-9A-Za-z]{5,32}$")


class QueueError(Exception):
    """The queue could not be read or changed; the message says why."""


@dataclass(frozen=True, slots=True)
class QueuedRecipient:
    address: str
    # Why delivery was deferred (Postfix's text, e.g. "connect to …: Connection refused").
    delay_reason: str = ""


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    queue_name: str  # "incoming", "active", "deferred", "hold" or "maildrop"
    queue_id: str
    arrival_time: int
    message_size: int
    sender: str
    recipients: tuple[QueuedRecipient, ...] = field(default=())
    forced_expire: bool = False

    @property
    def reasons(self) -> list[str]:
        """The distinct deferral reasons, in recipient order."""
        seen: list[str] = []
        for r in self.recipients:
            if r.delay_reason and r.delay_reason not in seen:
                seen.append(r.delay_reason)
        return seen

    def as_json(self) -> dict[str, Any]:
        return {
            "queue_name": self.queue_name,
            "queue_id": self.queue_id,
            "arrival_time": self.arrival_time,
            "message_size": self.message_size,
            "sender": self.sender,
            "forced_expire": self.forced_expire,
            "recipients": [
                {"address": r.address, "delay_reason": r.delay_reason} for r in self.recipients
            ],
        }


def _field(obj: dict[str, Any], key: str, kind: type, line_no: int) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise QueueError(f"postqueue -j line {line_no}: {key!r} missing or not {kind.__name__}")
    return value


def parse_queue_line(line: str, line_no: int = 1) -> QueuedMessage:
    """One `postqueue -j` line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QueueError(f"postqueue -j line {line_no}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise QueueError(f"postqueue -j line {line_no}: not a JSON object")
    recipients = []
    for item in _field(obj, "recipients", list, line_no):
        if not isinstance(item, dict) or not isinstance(item.get("address"), str):
            raise QueueError(f"postqueue -j line {line_no}: a recipient without an address")
        reason = item.get("delay_reason", "")
        recipients.append(
            QueuedRecipient(item["address"], reason if isinstance(reason, str) else "")
        )
    return QueuedMessage(
        queue_name=_field(obj, "queue_name", str, line_no),
        queue_id=_field(obj, "queue_id", str, line_no),
        arrival_time=_field(obj, "arrival_time", int, line_no),
        message_size=_field(obj, "message_size", int, line_no),
        sender=_field(obj, "sender", str, line_no),
        recipients=tuple(recipients),
        forced_expire=bool(obj.get("forced_expire", False)),
    )


def parse_queue(output: str) -> list[QueuedMessage]:
    """All of `postqueue -j`'s output (an empty queue prints nothing)."""
    return [
        parse_queue_line(line, n) for n, line in enumerate(output.splitlines(), 1) if line.strip()
    ]


def check_queue_id(queue_id: str) -> str:
    """A queue id as Postfix prints it; anything else (e.g. "-x" or "ALL") is refused."""
    if not _QUEUE_ID_RE.match(queue_id):
        raise QueueError(f"{queue_id!r} is not a Postfix queue id (letters and digits)")
    return queue_id


def _config_args(config_dir: Path | None) -> list[str]:
    return ["-c", str(config_dir)] if config_dir is not None else []


def list_argv(config_dir: Path | None) -> list[str]:
    return ["postqueue", *_config_args(config_dir), "-j"]


def resend_argv(config_dir: Path | None, queue_id: str | None) -> list[str]:
    """Deliver one message now (`postqueue -i ID`), or everything queued (`postqueue -f`)."""
    if queue_id is None:
        return ["postqueue", *_config_args(config_dir), "-f"]
    return ["postqueue", *_config_args(config_dir), "-i", check_queue_id(queue_id)]


def delete_argv(config_dir: Path | None, queue_id: str | None) -> list[str]:
    """Delete one message (`postsuper -d ID`) or all of them (`postsuper -d ALL`)."""
    target = "ALL" if queue_id is None else check_queue_id(queue_id)
    return ["postsuper", *_config_args(config_dir), "-d", target]


def deleted_count(output: str) -> int:
    """How many messages `postsuper -d` says it deleted ("postsuper: Deleted: 2 messages")."""
    match = re.search(r"Deleted: (\d+) messages?", output)
    return int(match.group(1)) if match else 0


def format_message(message: QueuedMessage) -> list[str]:
    """Lines for `queue list`, in the spirit of `mailq`."""
    head = (
        f"{message.queue_id}  {message.queue_name:<8} {message.message_size:>8} bytes  "
        f"from <{message.sender}>"
    )
    lines = [head]
    for r in message.recipients:
        lines.append(f"    to <{r.address}>")
        if r.delay_reason:
            lines.append(f"       ({r.delay_reason})")
    return lines


def select(messages: Sequence[QueuedMessage], queue_name: str | None) -> list[QueuedMessage]:
    return [m for m in messages if queue_name is None or m.queue_name == queue_name]
