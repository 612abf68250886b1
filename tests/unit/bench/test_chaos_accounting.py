"""The fault harness's tally: which counts fail a run, and what the report shows."""

from __future__ import annotations

from bench.chaos.accounting import Delivery, render_table, render_verdict, tally
from bench.chaos.sender import Kind, Message, Outcome


def _outcome(token: str, kind: Kind, status: str) -> Outcome:
    message = Message(token, kind, "s@remote.test", "alice@example.test", "198.51.100.2", 25)
    return Outcome(message, status=status, attempts=1, final_reply=f"{status} reply")


DELIVERED = {"t1": [Delivery("alice@example.test", dkim_ours_pass=False)]}


def _run(*statuses: tuple[str, Kind, str]) -> tuple[str, str, bool, bool]:
    outcomes = [_outcome(*s) for s in statuses]
    result = tally(outcomes, DELIVERED, queued=(), bounce_notices=())
    return (
        render_table(result, "t"),
        render_verdict(result),
        result.failed,
        bool(result.failures(count_gave_up=True)),
    )


def _main_row(table: str) -> dict[str, str]:
    head, _rule, row = table.splitlines()[2:5]
    columns = [c.strip() for c in head.strip("|").split("|")]
    values = [c.strip() for c in row.strip("|").split("|")]
    return dict(zip(columns, values, strict=True))


def test_a_sender_that_gave_up_is_its_own_column_and_named_in_the_result() -> None:
    table, verdict, failed, failed_counting_gave_up = _run(
        ("t1", "inbound", "accepted"), ("t2", "inbound", "gave_up")
    )
    assert _main_row(table)["gave up"] == "1"
    assert not failed  # by default the exit status does not count it ...
    assert "gave up 1" in verdict  # ... but the result line says so
    assert failed_counting_gave_up  # with --gave-up-fails it fails the run


def test_a_refused_forbidden_sender_is_bounced_not_gave_up_and_fails_nothing() -> None:
    table, verdict, failed, failed_counting_gave_up = _run(
        ("t1", "inbound", "accepted"), ("t2", "forbidden", "refused")
    )
    row = _main_row(table)
    assert (row["bounced"], row["gave up"]) == ("1", "0")
    assert verdict == "result: passed"
    assert not failed
    assert not failed_counting_gave_up


def test_a_lost_message_fails_the_run_with_or_without_gave_up_counted() -> None:
    _table, verdict, failed, failed_counting_gave_up = _run(("t3", "inbound", "accepted"))
    assert verdict == "result: FAILED (lost 1)"
    assert failed
    assert failed_counting_gave_up
