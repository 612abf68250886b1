"""SMTP smuggling (CVE-2023-51764) through the real private Postfix + Dovecot.

An outside client (XCLIENT ADDR=198.51.100.x) sends one message whose body holds a
non-standard end-of-DATA sequence followed by a second, "smuggled" transaction. Only
<CR><LF>.<CR><LF> may end DATA: the outer message may be refused or delivered whole, but
the smuggled one must never reach a mailbox, which the test reads over IMAP.
"""

from __future__ import annotations

import socket
import time

import pytest

from tests.fixtures.mail_system import HOST, MailSystem, MailSystemFactory

pytestmark = pytest.mark.e2e

ALICE, ALICE_PW = "alice@example.test", "alice-secret"

# Every bare-CR / bare-LF form of "<line end>.<line end>" other than the standard one.
VARIANTS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "lf-dot-cr": b"\n.\r",
    "cr-dot-lf": b"\r.\n",
}


def _smuggle(mail: MailSystem, name: str, ending: bytes, client_ip: str) -> tuple[int, str]:
    """One outer message carrying `ending` and a smuggled transaction; the final reply."""
    outer = (
        f"From: <attacker@remote.test>\r\nTo: <{ALICE}>\r\nSubject: outer {name}\r\n\r\nouter body"
    ).encode()
    smuggled = (
        f"MAIL FROM:<ceo@bigbank.example>\r\nRCPT TO:<{ALICE}>\r\nDATA\r\n"
        f"From: <ceo@bigbank.example>\r\nTo: <{ALICE}>\r\nSubject: smuggled {name}\r\n\r\n"
        "wire the money\r\n"
    ).encode()
    with mail.raw_smtp(client_ip=client_ip) as session:
        assert session.command("MAIL FROM:<attacker@remote.test>")[0] == 250
        assert session.command(f"RCPT TO:<{ALICE}>")[0] == 250
        assert session.command("DATA")[0] == 354
        session.send(outer + ending + smuggled + b"\r\n.\r\n")
        # A server fooled by `ending` answers the outer message, then the smuggled
        # MAIL/RCPT/DATA and its end: read every reply until the server falls silent.
        replies = []
        session.sock.settimeout(3)
        try:
            while (reply := session.reply())[0]:
                replies.append(reply)
        except TimeoutError:
            pass
        session.sock.settimeout(10)
        session.send(b"QUIT\r\n")
    assert replies, f"no reply to the message with {name}"
    return replies[0]


def test_no_bare_cr_or_lf_end_of_data_smuggles_a_second_message(
    mail_system_factory: MailSystemFactory,
) -> None:
    mail = mail_system_factory()
    outcomes = {
        name: _smuggle(mail, name, ending, f"198.51.100.{i + 10}")
        for i, (name, ending) in enumerate(VARIANTS.items())
    }
    # A marker sent last: once it and every accepted outer message are in, and the queue
    # is empty, whatever the server accepted has been delivered.
    assert mail.smtp_send("a@remote.test", ALICE, subject="marker", client_ip="198.51.100.9")
    accepted = [name for name, (code, _) in outcomes.items() if code == 250]
    messages = mail.wait_for_delivery(ALICE, ALICE_PW, count=len(accepted) + 1)
    deadline = time.monotonic() + 10
    while mail.queue() and time.monotonic() < deadline:
        time.sleep(0.2)
    messages = mail.imap_fetch(ALICE, ALICE_PW)
    subjects = sorted(str(m["Subject"]) for m in messages)
    assert not [s for s in subjects if s.startswith("smuggled")], (outcomes, subjects)
    assert not [m for m in messages if "bigbank" in str(m["From"])], subjects
    # Nothing was split off: each accepted outer message arrived once, as one message.
    assert subjects == sorted(["marker", *(f"outer {name}" for name in accepted)]), outcomes


def test_commands_sent_before_the_greeting_end_the_session(
    mail_system_factory: MailSystemFactory,
) -> None:
    # The other half of smuggling: a client that does not wait for the server's replies.
    mail = mail_system_factory()
    with socket.create_connection((HOST, mail.ports["smtp_port"]), timeout=10) as sock:
        sock.sendall(b"EHLO mail.remote.test\r\nMAIL FROM:<a@remote.test>\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert b"554 5.5.0 Error: SMTP protocol synchronization" in answer, answer
    mail.wait_for_log("improper command pipelining")
