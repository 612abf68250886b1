#!/usr/bin/env bash
# Smoke test of an installed gateway (run as root on the host scripts/install.sh set up:
# the Vagrant box, or the CI machine itself):
#   1. a test mailbox user exists (created in /etc/postwarden/users when missing),
#   2. a message goes in over SMTP (port 25 from loopback, a trusted network), one to a
#      forwarding alias added just before (live, no reload), and one over submission
#      (587, STARTTLS + login as the test user),
#   3. all are read back from the test mailbox over IMAP (143 with STARTTLS),
#   4. each carries a DKIM signature that verifies against the configured key,
#   5. the mail log tells the story: port 25's smtpd connect line (logged as plain
#      postfix/smtpd, which fail2ban's filters know), the submission login, a delivery line
#      with status=sent for each message, Dovecot's IMAP login; read from the journal under
#      systemd, else from /var/log/mail.log and /var/log/dovecot.log,
#   6. no daemon that only the test packages bring (redis-server, nsd, ...) runs as a service.
# Exit 0 when all of that holds; otherwise 1 with what failed.
set -euo pipefail

CONFIG=${POSTWARDEN_CONFIG:-/etc/postwarden/postwarden.toml}
USERS=/etc/postwarden/users
PY=/opt/postwarden/venv/bin/python
SMOKE_PASSWORD=${SMOKE_PASSWORD:-smoke-test-password}

[[ $EUID -eq 0 ]] || { echo "smoke: run as root" >&2; exit 1; }
[[ -x $PY ]] || { echo "smoke: $PY missing: run scripts/install.sh first" >&2; exit 1; }

domain=$("$PY" -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["mail"]["main_domain"])' "$CONFIG")
user="smoke@$domain"
if ! grep -q "^$user:" "$USERS" 2>/dev/null; then
    hash=$(doveadm pw -s SHA512-CRYPT -p "$SMOKE_PASSWORD")
    printf '%s:%s::::::\n' "$user" "$hash" >>"$USERS"
    echo "smoke: created mailbox user $user in $USERS"
fi

# A forwarding alias, added while everything runs: Postfix asks policyd's socketmap at
# delivery time, so mail to it must arrive in the test mailbox without any reload.
runuser -u postwarden -- /opt/postwarden/venv/bin/postwarden --config "$CONFIG" \
    aliases add "smoke-alias@$domain" "$user" >/dev/null

exec "$PY" - "$CONFIG" "$user" "$SMOKE_PASSWORD" "smoke-alias@$domain" <<'EOF'
"""Send in over SMTP and submission, read back over IMAP, verify the DKIM signatures."""

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
from pathlib import Path

import dkim

from postwarden.config import load_config
from postwarden.dns.readiness_report import dkim_record

config_path, user, password, alias = sys.argv[1:5]
cfg = load_config(config_path)
mail = cfg.mail
HOST = "127.0.0.1"
DELIVERY_TIMEOUT = 60.0
RETRY_TIMEOUT = 60.0


def fail(message: str) -> None:
    print(f"smoke: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def tls_context() -> ssl.SSLContext:
    # The appliance may run on its self-signed pair; this checks the gateway, not the PKI.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message(tag: str, how: str) -> bytes:
    return (
        f"From: <{user}>\r\nTo: <{user}>\r\nSubject: postwarden smoke {tag}\r\n"
        f"Message-ID: <{tag}@{mail.hostname}>\r\n"
        f"Date: {email.utils.formatdate()}\r\n\r\n"
        f"Sent by vagrant/smoke.sh over {how}.\r\n"
    ).encode()


def send(port: int, rcpt: str, tag: str, how: str, login: bool = False) -> None:
    """One message in; a 4xx (a mailbox probe still running) is retried like an MTA would."""
    deadline = time.monotonic() + RETRY_TIMEOUT
    while True:
        try:
            with smtplib.SMTP(HOST, port, timeout=30) as smtp:
                smtp.ehlo("smoke.localhost")
                if login:
                    smtp.starttls(context=tls_context())
                    smtp.ehlo("smoke.localhost")
                    smtp.login(user, password)
                smtp.sendmail(user, [rcpt], message(tag, how))
            return
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients[rcpt]
            if not 400 <= code < 500 or time.monotonic() > deadline:
                fail(f"sending over {how}: {code} {text.decode(errors='replace')}")
            print(f"smoke: {how}: {code}, retrying")
            time.sleep(1)
        except (OSError, smtplib.SMTPException) as exc:
            fail(f"sending over {how}: {exc}")


started = time.time()
run = uuid.uuid4().hex[:12]
sent: dict[str, str] = {}
send(mail.smtp_port, user, f"{run}-smtp", f"SMTP port {mail.smtp_port}")
sent[f"{run}-smtp"] = f"SMTP :{mail.smtp_port}"
print(f"smoke: sent over SMTP port {mail.smtp_port}")
send(mail.smtp_port, alias, f"{run}-alias", f"SMTP to the alias {alias}")
sent[f"{run}-alias"] = f"alias {alias}"
print(f"smoke: sent to the forwarding alias {alias}")
if mail.submission:
    send(mail.submission_port, user, f"{run}-587", "submission with login", login=True)
    sent[f"{run}-587"] = f"submission :{mail.submission_port}"
    print(f"smoke: sent over submission port {mail.submission_port} (STARTTLS, login)")

keys = {(k.domain, k.selector): dkim_record(k.key.read_bytes()) for k in cfg.dkim.keys}


def dns_from_config(name: bytes, timeout: int = 5) -> bytes:
    # "<selector>._domainkey.<domain>." -> the record of the configured key (the one the
    # operator is told to publish), so the check does not depend on public DNS.
    labels = name.decode().rstrip(".").split(".")
    record = keys.get((".".join(labels[2:]), labels[0]))
    return record.encode() if record else b""


found: dict[str, bytes] = {}
deadline = time.monotonic() + DELIVERY_TIMEOUT
while len(found) < len(sent) and time.monotonic() < deadline:
    try:
        imap = imaplib.IMAP4(HOST, mail.imap_port, timeout=30)
        imap.starttls(ssl_context=tls_context())
        imap.login(user, password)
        imap.select("INBOX")
        for tag in sent:
            if tag in found:
                continue
            _, data = imap.search(None, "HEADER", "Message-ID", tag)
            for num in data[0].split():
                _, parts = imap.fetch(num, "(RFC822)")
                found[tag] = parts[0][1]
        imap.logout()
    except (OSError, imaplib.IMAP4.error) as exc:
        print(f"smoke: IMAP not ready yet: {exc}")
    if len(found) < len(sent):
        time.sleep(1)
missing = [sent[t] for t in sent if t not in found]
if missing:
    fail(f"not delivered within {DELIVERY_TIMEOUT:.0f}s (read over IMAP): {', '.join(missing)}")
print(f"smoke: read {len(found)} message(s) back over IMAP port {mail.imap_port} (STARTTLS)")

for tag, raw in found.items():
    signature = email.message_from_bytes(raw, policy=email.policy.compat32)["DKIM-Signature"]
    if signature is None:
        fail(f"{sent[tag]}: no DKIM-Signature header")
    if not dkim.verify(raw, dnsfunc=dns_from_config):
        fail(f"{sent[tag]}: DKIM signature does not verify against the configured key")
    tags = dict(t.strip().split("=", 1) for t in " ".join(signature.split()).split(";") if "=" in t)
    print(f"smoke: {sent[tag]}: DKIM signature d={tags.get('d')} s={tags.get('s')} verifies")

SYSTEMD = Path("/run/systemd/system").is_dir()
LOG_TIMEOUT = 30.0


def mail_log() -> str:
    """Postfix's and Dovecot's lines: the journal under systemd, else their files."""
    if SYSTEMD:
        # Debian 12 runs Postfix as the instance unit postfix@-.
        return subprocess.run(
            [
                "journalctl",
                "--quiet",
                "--no-pager",
                "--output=short",
                f"--since=@{int(started) - 1}",
                "--unit=postfix@-",
                "--unit=dovecot",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    return "".join(
        Path(p).read_text(errors="replace") for p in ("/var/log/mail.log", "/var/log/dovecot.log")
    )


def log_checks(log: str) -> list[str]:
    """What the log still lacks (empty: all there)."""
    lacking = []
    for tag, what in sent.items():
        queued = re.search(rf"\]: ([0-9A-F]+): message-id=<{tag}@", log)
        if queued is None:
            lacking.append(f"{what}: cleanup's message-id=<{tag}@...> line")
            continue
        qid = queued.group(1)
        if not re.search(rf"\]: {qid}: to=<{re.escape(user)}>.* status=sent ", log):
            lacking.append(f"{what}: a delivery line {qid}: to=<{user}>, ... status=sent")
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
            rf"/submission/smtpd\[\d+\]: {qid}: client=.*sasl_username={re.escape(user)}", log
        ):
            lacking.append(f"{what}: the login sasl_username={user}")
    if not re.search(rf"imap-login: (Info: )?Login: user=<{re.escape(user)}>", log):
        lacking.append(f"Dovecot's imap-login: Login: user=<{user}> line")
    return lacking


deadline = time.monotonic() + LOG_TIMEOUT
while (lacking := log_checks(mail_log())) and time.monotonic() < deadline:
    time.sleep(0.5)
if lacking:
    where = (
        "the journal (postfix@-, dovecot)" if SYSTEMD else "/var/log/mail.log, /var/log/dovecot.log"
    )
    fail(f"{where} lacks: {'; '.join(lacking)}")
print(
    f"smoke: the mail log ({'journal' if SYSTEMD else 'files'}) has each message's delivery"
    " (status=sent), port 25's postfix/smtpd connect, the submission login and the IMAP login"
)

TEST_ONLY_SERVICES = ("redis-server", "nsd", "postgrey", "opendkim", "dkimpy-milter")
running = []
for service in TEST_ONLY_SERVICES:
    if SYSTEMD:
        active = ["systemctl", "is-active", "--quiet", service]
        up = subprocess.run(active, check=False, timeout=30).returncode == 0
    else:
        script = f"/etc/init.d/{service}"
        up = (
            os.access(script, os.X_OK)
            and subprocess.run(
                [script, "status"], capture_output=True, check=False, timeout=30
            ).returncode
            == 0
        )
    if up:
        running.append(service)
if running:
    fail(f"test-only services run on the gateway: {', '.join(running)} (the appliance needs none)")
print("smoke: no test-only service runs")
print("smoke: OK")
EOF
