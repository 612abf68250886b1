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
PW=/opt/postwarden/venv/bin/postwarden
HERE=$(cd "$(dirname "$0")" && pwd)
SMOKE_PASSWORD=${SMOKE_PASSWORD:-smoke-test-password}

[[ $EUID -eq 0 ]] || { echo "smoke: run as root" >&2; exit 1; }
[[ -x $PY ]] || { echo "smoke: $PY missing: run scripts/install.sh first" >&2; exit 1; }

# Values come through postwarden's own config model (defaults included), never the TOML.
domain=$("$PW" --config "$CONFIG" config get mail.main_domain) \
    || { echo "smoke: cannot read mail.main_domain from $CONFIG" >&2; exit 1; }
user="smoke@$domain"
if ! grep -q "^$user:" "$USERS" 2>/dev/null; then
    hash=$(doveadm pw -s SHA512-CRYPT -p "$SMOKE_PASSWORD")
    printf '%s:%s::::::\n' "$user" "$hash" >>"$USERS"
    echo "smoke: created mailbox user $user in $USERS"
fi

# A forwarding alias, added while everything runs: Postfix asks policyd's socketmap at
# delivery time, so mail to it must arrive in the test mailbox without any reload.
runuser -u postwarden -- "$PW" --config "$CONFIG" \
    aliases add "smoke-alias@$domain" "$user" >/dev/null

# The checks themselves (send, read back, DKIM, the mail log, no test-only services) are a
# Python module checked by ruff and mypy; it reads the config through postwarden's model.
exec "$PY" "$HERE/smoke_checks.py" "$CONFIG" "$user" "$SMOKE_PASSWORD" "smoke-alias@$domain"
