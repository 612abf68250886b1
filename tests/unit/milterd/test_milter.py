"""milterd's one log line per message: policyd's format, with the DKIM outcome."""

from __future__ import annotations

from milterd.message_handler import Changes, Envelope, MessageRule
from milterd.milter import message_line


def test_signed_message_line() -> None:
    envelope = Envelope("192.0.2.10", "alice@example.com", "4ABCDEF", "alice@example.com")
    changes = Changes(
        rule=MessageRule.SIGN,
        domains=("example.com", "example.com"),
        selectors=("s1", "e1"),
        dkim="signed",
        body=b"broken\r\n",
        remove_results=[1],
    )
    assert message_line(envelope, "mail.example.com", changes, 0.0123) == (
        "milterd: 4ABCDEF: client=mail.example.com[192.0.2.10], from=<alice@example.com>, "
        "login=alice@example.com, domain=example.com/example.com, selector=s1/e1, dkim=signed, "
        "rule=sign, long_lines=broken, forged_ar_removed=1, ms=12.30"
    )


def test_inbound_message_line_without_login_or_client_name() -> None:
    changes = Changes(
        rule=MessageRule.VERIFY,
        domains=("a.test", "b.test"),
        selectors=("x", "y"),
        dkim="pass/fail",
    )
    line = message_line(Envelope(None, None, "NOQUEUE", None), None, changes, 0.001)
    assert line == (
        "milterd: NOQUEUE: client=unknown[local], from=<>, domain=a.test/b.test, "
        "selector=x/y, dkim=pass/fail, rule=verify, ms=1.00"
    )


def test_a_hostile_from_domain_cannot_forge_a_line() -> None:
    changes = Changes(rule=MessageRule.NO_KEY, domains=("evil\r\nINFO forged",), dkim="unsigned")
    line = message_line(Envelope("192.0.2.1", None, "Q", "a\nb@x"), "h", changes, 0.0)
    assert "\n" not in line and "\r" not in line
