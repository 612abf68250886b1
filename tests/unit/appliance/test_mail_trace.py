"""`postwarden trace`'s parser: which lines belong to which message, from every log."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from postwarden.appliance.mail_trace import TraceQuery, parse_line, trace

LOGS = Path(__file__).parent / "trace_logs"
# A greylisted attempt, its accepted retry (4A1B2C3D4E), a second message, another client.
POSTFIX = (LOGS / "mail.log").read_text(encoding="utf-8").splitlines()
# policyd's and milterd's lines for the same: RCPT-stage lines carry only the instance.
POLICYD = (LOGS / "postwarden.log").read_text(encoding="utf-8").splitlines()


def test_a_line_of_each_source_is_recognised() -> None:
    line = parse_line(POSTFIX[4], 2026)
    assert (line.source, line.queue_id, line.pid) == ("postfix/smtpd", "4A1B2C3D4E", "11")
    assert line.when == datetime(2026, 12, 3, 10, 5, 2)
    ours = parse_line(POLICYD[2], 2026)
    assert (ours.source, ours.queue_id) == ("policyd", "4A1B2C3D4E")
    assert parse_line(POSTFIX[1], 2026).queue_id is None  # NOQUEUE
    assert parse_line(POLICYD[4], 2026).source == ""  # not a decision line


def test_a_queue_id_brings_its_session_its_rcpt_verdict_and_its_dkim_result() -> None:
    (message,), refused = trace(POSTFIX + POLICYD, TraceQuery(queue_id="4A1B2C3D4E"), 2026)
    texts = [line.text for line in message.lines]
    assert texts[0] == POSTFIX[2]  # its own session's connect, not the other client's
    assert POLICYD[1] in texts  # RCPT stage, joined through instance i.2
    assert POLICYD[0] not in texts  # the earlier attempt (instance i.1) is not this message
    assert POLICYD[3] in texts and POSTFIX[6] in texts
    assert message.outcomes == [
        "to=<bob@example.test>, relay=local, dsn=2.0.0, status=sent (250 2.0.0 Saved)"
    ]
    assert refused == []  # by queue id, refusals are not searched


def test_sender_and_recipient_must_both_belong_to_one_message() -> None:
    messages, refused = trace(
        POSTFIX + POLICYD, TraceQuery(sender="A@remote.test", recipient="bob@example.test"), 2026
    )
    assert [m.queue_id for m in messages] == ["4A1B2C3D4E"]
    # The greylisted first attempt: Postfix's refusal and policyd's rule, listed apart.
    assert [line.text for line in refused] == [POSTFIX[1], POLICYD[0]]
    by_sender, _ = trace(POSTFIX + POLICYD, TraceQuery(sender="a@remote.test"), 2026)
    assert [m.queue_id for m in by_sender] == ["4A1B2C3D4E", "5B2C3D4E5F"]


def test_since_leaves_out_earlier_lines() -> None:
    query = TraceQuery(sender="a@remote.test", since=datetime(2026, 12, 3, 10, 5, 3))
    messages, refused = trace(POSTFIX + POLICYD, query, 2026)
    assert [m.queue_id for m in messages] == ["5B2C3D4E5F"] and refused == []
