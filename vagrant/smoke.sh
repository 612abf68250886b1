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
#   6. no daemon that only the test packages bring (redis-server, nsd, ...) runs as a service,
#   7. no process of Postfix's or Dovecot's may write a core dump (RLIMIT_CORE 0 in each
#      master and in every process it runs; smtpd and Dovecot's auth and login processes
#      see passwords).
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
"$PY" "$HERE/smoke_checks.py" "$CONFIG" "$user" "$SMOKE_PASSWORD" "smoke-alias@$domain"

# No core dumps from the processes that see passwords (Dovecot's auth and login processes,
# Postfix's smtpd): Dovecot's and Postfix's masters, found through their own pid files, and
# every process each runs now (after the logins above: smtpd, auth, ...) have RLIMIT_CORE
# 0, soft and hard (install.sh: a LimitCORE=0 drop-in under systemd, else `ulimit -c 0`).
core_limit_zero() { # pid: "Max core file size  0  0  bytes" in its limits
    awk '$1 == "Max" && $2 == "core" { found = 1; zero = ($5 == "0" && $6 == "0") }
        END { exit !(found && zero) }' "/proc/$1/limits" 2>/dev/null
}
nocore_failed=0
for entry in "$(postconf -h queue_directory)/pid/master.pid /usr/lib/postfix/sbin/master" \
    "$(doveconf -h base_dir 2>/dev/null)/master.pid /usr/sbin/dovecot"; do
    read -r file program <<<"$entry"
    pid=
    # Postfix pads its pid with blanks; read trims them.
    if [[ -r $file ]] && read -r pid <"$file" && [[ $pid =~ ^[1-9][0-9]*$ ]] \
        && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n 1 | grep -qxF "$program"
    then
        checked=0 failed_here=0
        for p in "$pid" $(ps -o pid= --ppid "$pid" || true); do
            [[ -e /proc/$p ]] || continue  # exited meanwhile
            if core_limit_zero "$p"; then
                checked=$((checked + 1))
            elif [[ -e /proc/$p ]]; then
                echo "smoke: FAIL: $(ps -o comm= -p "$p") (pid $p, under $program) may dump" \
                    "core: $(grep '^Max core' "/proc/$p/limits")" >&2
                failed_here=1
            fi
        done
        if ((failed_here)); then nocore_failed=1; else
            echo "smoke: no core dumps: $program (pid $pid) and its children," \
                "$checked processes with RLIMIT_CORE 0 (soft and hard)"
        fi
    else
        echo "smoke: FAIL: no running $program found through $file" >&2
        nocore_failed=1
    fi
done
if ((nocore_failed)); then
    echo "smoke: FAIL: Postfix or Dovecot may write core dumps (the mail checks above passed)" >&2
    exit 1
fi
