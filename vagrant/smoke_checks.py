"""The mail checks of vagrant/smoke.sh against an installed gateway: send in over SMTP and
submission, read back over IMAP, verify the DKIM signatures, read the mail log, and make
sure no test-only service runs.

Run by smoke.sh with the appliance's interpreter (/opt/postwarden/venv/bin/python), which
reads the config through the one config model:
    smoke_checks.py CONFIG USER PASSWORD ALIAS
Exit 0 when all of that holds; otherwise 1 with what failed.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import imaplib
import os
import re
import smtplib
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import dkim

from postwarden.config import Config, load_config
from postwarden.dns.readiness_report import dkim_record

HOST = "127.0.0.1"
DELIVERY_TIMEOUT = 60.0  # seconds for every message to be readable over IMAP
RETRY_TIMEOUT = 60.0  # seconds a 4xx at RCPT (a mailbox probe still running) is retried for
LOG_TIMEOUT = 30.0  # seconds for the mail log to show every line the checks look for
TOOL_TIMEOUT = 60  # seconds for journalctl, systemctl or an init script to answer
TEST_ONLY_SERVICES = ("redis-server", "nsd", "postgrey", "opendkim", "dkimpy-milter")
SYSTEMD = Path("/run/systemd/system").is_dir()


class SmokeFailure(Exception):
    """One check failed; the message says which and why."""


@dataclass
class Smoke:
    """One smoke run: who sends, and what was sent (Message-ID tag -> how it went in)."""

    cfg: Config
    user: str
    password: str
    alias: str
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    started: float = field(default_factory=time.time)
    sent: dict[str, str] = field(default_factory=dict)


def tls_context() -> ssl.SSLContext:
    # The appliance may run on its self-signed pair; this checks the gateway, not the PKI.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(smoke: Smoke, tag: str, how: str) -> bytes:
    return (
        f"From: <{smoke.user}>\r\nTo: <{smoke.user}>\r\nSubject: postwarden smoke {tag}\r\n"
        f"Message-ID: <{tag}@{smoke.cfg.mail.hostname}>\r\n"
        f"Date: {email.utils.formatdate()}\r\n\r\n"
        f"Sent by vagrant/smoke.sh over {how}.\r\n"
    ).encode()


def send(smoke: Smoke, port: int, rcpt: str, tag: str, how: str, login: bool = False) -> None:
    """One message in; a 4xx (a mailbox probe still running) is retried like an MTA would."""
    deadline = time.monotonic() + RETRY_TIMEOUT
    while True:
        try:
            with smtplib.SMTP(HOST, port, timeout=30) as smtp:
                smtp.ehlo("smoke.localhost")
                if login:
                    smtp.starttls(context=tls_context())
                    smtp.ehlo("smoke.localhost")
                    smtp.login(smoke.user, smoke.password)
                smtp.sendmail(smoke.user, [rcpt], message(smoke, tag, how))
            return
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[rcpt]
            if not 400 <= code < 500 or time.monotonic() > deadline:
                raise SmokeFailure(
                    f"sending over {how}: {code} {text.decode(errors='replace')}"
                ) from None
            print(f"smoke: {how}: {code}, retrying")
            time.sleep(1)
        except (OSError, smtplib.SMTPException) as exc:
            raise SmokeFailure(f"sending over {how}: {exc}") from None


def send_all(smoke: Smoke) -> None:
    mail = smoke.cfg.mail
    tag = f"{smoke.run}-smtp"
    send(smoke, mail.smtp_port, smoke.user, tag, f"SMTP port {mail.smtp_port}")
    smoke.sent[tag] = f"SMTP :{mail.smtp_port}"
    print(f"smoke: sent over SMTP port {mail.smtp_port}")
    tag = f"{smoke.run}-alias"
    send(smoke, mail.smtp_port, smoke.alias, tag, f"SMTP to the alias {smoke.alias}")
    smoke.sent[tag] = f"alias {smoke.alias}"
    print(f"smoke: sent to the forwarding alias {smoke.alias}")
    if mail.submission:
        tag = f"{smoke.run}-587"
        send(smoke, mail.submission_port, smoke.user, tag, "submission with login", login=True)
        smoke.sent[tag] = f"submission :{mail.submission_port}"
        print(f"smoke: sent over submission port {mail.submission_port} (STARTTLS, login)")


def read_back(smoke: Smoke) -> dict[str, bytes]:
    """Each sent message as read over IMAP (143, STARTTLS), keyed by its tag."""
    port = smoke.cfg.mail.imap_port
    found: dict[str, bytes] = {}
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while len(found) < len(smoke.sent) and time.monotonic() < deadline:
        try:
            imap = imaplib.IMAP4(HOST, port, timeout=30)
            imap.starttls(ssl_context=tls_context())
            imap.login(smoke.user, smoke.password)
            imap.select("INBOX")
            for tag in smoke.sent:
                if tag in found:
                    continue
                _, data = imap.search(None, "HEADER", "Message-ID", tag)
                for num in data[0].split():
                    _, parts = imap.fetch(num, "(RFC822)")
                    # [(b"1 (RFC822 {n}", b"<the message>"), b")"]
                    envelope = parts[0]
                    if isinstance(envelope, tuple):
                        found[tag] = envelope[1]
            imap.logout()
        except (OSError, imaplib.IMAP4.error) as exc:
            print(f"smoke: IMAP not ready yet: {exc}")
        if len(found) < len(smoke.sent):
            time.sleep(1)
    missing = [what for tag, what in smoke.sent.items() if tag not in found]
    if missing:
        raise SmokeFailure(
            f"not delivered within {DELIVERY_TIMEOUT:.0f}s (read over IMAP): {', '.join(missing)}"
        )
    print(f"smoke: read {len(found)} message(s) back over IMAP port {port} (STARTTLS)")
    return found


def verify_signatures(smoke: Smoke, found: dict[str, bytes]) -> None:
    keys = {(k.domain, k.selector): dkim_record(k.key.read_bytes()) for k in smoke.cfg.dkim.keys}

    def dns_from_config(name: bytes, timeout: int = 5) -> bytes:
        # "<selector>._domainkey.<domain>." -> the record of the configured key (the one the
        # operator is told to publish), so the check does not depend on public DNS.
        labels = name.decode().rstrip(".").split(".")
        record = keys.get((".".join(labels[2:]), labels[0]))
        return record.encode() if record else b""

    for tag, raw in found.items():
        what = smoke.sent[tag]
        signature = email.message_from_bytes(raw, policy=email.policy.compat32)["DKIM-Signature"]
        if signature is None:
            raise SmokeFailure(f"{what}: no DKIM-Signature header")
        if not dkim.verify(raw, dnsfunc=dns_from_config):
            raise SmokeFailure(f"{what}: DKIM signature does not verify against the configured key")
        parts = " ".join(str(signature).split()).split(";")
        tags = dict(t.strip().split("=", 1) for t in parts if "=" in t)
        print(f"smoke: {what}: DKIM signature d={tags.get('d')} s={tags.get('s')} verifies")


def mail_log(since: float) -> str:
    """Postfix's and Dovecot's lines: the journal under systemd, else their files."""
    if SYSTEMD:
        # Debian 12 runs Postfix as the instance unit postfix@-.
        return subprocess.run(
            [
                "journalctl",
                "--quiet",
                "--no-pager",
                "--output=short",
                f"--since=@{int(since) - 1}",
                "--unit=postfix@-",
                "--unit=dovecot",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=TOOL_TIMEOUT,
        ).stdout
    return "".join(
        Path(p).read_text(errors="replace") for p in ("/var/log/mail.log", "/var/log/dovecot.log")
    )


def log_checks(smoke: Smoke, log: str) -> list[str]:
    """What the log still lacks (empty: all there)."""
    user = re.escape(smoke.user)
    lacking = []
    for tag, what in smoke.sent.items():
        queued = re.search(rf"\]: ([0-9A-F]+): message-id=<{tag}@", log)
        if queued is None:
            lacking.append(f"{what}: cleanup's message-id=<{tag}@...> line")
            continue
        qid = queued.group(1)
        if not re.search(rf"\]: {qid}: to=<{user}>.* status=sent ", log):
            lacking.append(f"{what}: a delivery line {qid}: to=<{smoke.user}>, ... status=sent")
        client = re.search(rf" (postfix[^ ]*/smtpd)\[(\d+)\]: {qid}: client=", log)
        if client is None:
            lacking.append(f"{what}: smtpd's {qid}: client=... line")
        elif what.startswith("SMTP :"):
            name, pid = client.groups()
            if name != "postfix/smtpd":
                lacking.append(f"port 25 logs as {name}, not postfix/smtpd (fail2ban's name)")
            elif f" postfix/smtpd[{pid}]: connect from " not in log:
                lacking.append(f"port 25's postfix/smtpd[{pid}]: connect from ... line")
        elif what.startswith("submission") and not re.search(
            rf"/submission/smtpd\[\d+\]: {qid}: client=.*sasl_username={user}", log
        ):
            lacking.append(f"{what}: the login sasl_username={smoke.user}")
    if not re.search(rf"imap-login: (Info: )?Login: user=<{user}>", log):
        lacking.append(f"Dovecot's imap-login: Login: user=<{smoke.user}> line")
    return lacking


def check_log(smoke: Smoke) -> None:
    deadline = time.monotonic() + LOG_TIMEOUT
    while (lacking := log_checks(smoke, mail_log(smoke.started))) and time.monotonic() < deadline:
        time.sleep(0.5)
    if lacking:
        where = (
            "the journal (postfix@-, dovecot)"
            if SYSTEMD
            else "/var/log/mail.log, /var/log/dovecot.log"
        )
        raise SmokeFailure(f"{where} lacks: {'; '.join(lacking)}")
    print(
        f"smoke: the mail log ({'journal' if SYSTEMD else 'files'}) has each message's delivery"
        " (status=sent), port 25's postfix/smtpd connect, the submission login and the IMAP login"
    )


def service_runs(service: str) -> bool:
    if SYSTEMD:
        active = ["systemctl", "is-active", "--quiet", service]
        return subprocess.run(active, check=False, timeout=TOOL_TIMEOUT).returncode == 0
    script = f"/etc/init.d/{service}"
    if not os.access(script, os.X_OK):
        return False
    status = subprocess.run([script, "status"], capture_output=True, check=False, timeout=30)
    return status.returncode == 0


def check_no_test_only_services() -> None:
    running = [s for s in TEST_ONLY_SERVICES if service_runs(s)]
    if running:
        raise SmokeFailure(
            f"test-only services run on the gateway: {', '.join(running)} "
            "(the appliance needs none)"
        )
    print("smoke: no test-only service runs")


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: smoke_checks.py CONFIG USER PASSWORD ALIAS", file=sys.stderr)
        return 2
    config_path, user, password, alias = argv
    smoke = Smoke(load_config(config_path), user, password, alias)
    try:
        send_all(smoke)
        verify_signatures(smoke, read_back(smoke))
        check_log(smoke)
        check_no_test_only_services()
    except SmokeFailure as exc:
        print(f"smoke: FAIL: {exc}", file=sys.stderr)
        return 1
    print("smoke: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
