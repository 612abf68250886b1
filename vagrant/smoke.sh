#!/usr/bin/env bash
# Smoke test of an installed gateway (run as root on the host scripts/install.sh set up:
# the Vagrant box, or the CI machine itself):
#   1. a test mailbox user exists (created in /etc/postwarden/users when missing),
#   2. a message goes in over SMTP (port 25 from loopback, a trusted network), one to a
#      forwarding alias added just before (live, no reload), and one over submission
#      (587, STARTTLS + login as the test user),
#   3. all are read back from the test mailbox over IMAP (143 with STARTTLS),
#   4. each carries a DKIM signature that verifies against the configured key.
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
import smtplib
import ssl
import sys
import time
import uuid

import dkim

from postwarden.config import load_config
from postwarden.dns_report import dkim_record

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
print("smoke: OK")
EOF
