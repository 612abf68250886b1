#!/usr/bin/env bash
# The appliance under a real systemd, where no VM can boot (CI, containers): a Debian 12
# root file system booted by systemd-nspawn with systemd as its PID 1, on a private
# network (loopback only). Inside it, as on the Vagrant box:
#   1. scripts/install.sh must take the systemd path (units installed, enabled, started),
#   2. vagrant/smoke.sh must pass (mail in over 25 and 587, IMAP read back, DKIM verified),
#   3. a second scripts/install.sh must change nothing; a SIGKILLed daemon or supervisor
#      serves again with nothing run by hand (vagrant/kill_and_recover.sh),
#   4. after a reboot, with nothing run by hand, the gateway is up and smoke.sh passes again
#      (smoke.sh also reads Postfix's and Dovecot's lines back from the journal),
#   5. with mail.fail2ban = true, install.sh runs fail2ban on the journal, and a client that
#      keeps failing SMTP AUTH or an IMAP login is banned.
# Run as root on a Debian host. A pristine root file system is cached in $MACHINE_DIR
# (packages and Python wheels are fetched into it with the host's network); every run
# boots a fresh copy of it, so the install starts from nothing. The booted machine has no
# network, so pip installs from that wheelhouse.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
MACHINE_DIR=${POSTWARDEN_MACHINE_DIR:-/var/lib/machines/postwarden-systemd}
MIRROR=${POSTWARDEN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOG=${TMPDIR:-/tmp}/postwarden-systemd-container.log

say() { echo "systemd-container: $*"; }
die() {
    echo "systemd-container: FAIL: $*" >&2
    exit 1
}
die_with_log() {
    tail -n 20 "$LOG" >&2
    die "$* (log: $LOG)"
}
[[ $EUID -eq 0 ]] || die "run as root"

# --- host tools ------------------------------------------------------------------------
missing=()
for p in systemd-container debootstrap; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]} on the host"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"$LOG" 2>&1 || die_with_log "apt-get install ${missing[*]}"
fi
# Without systemd on the host: nspawn keeps a propagation directory under /run, which it
# only ever removes from a tmpfs; where /run is not one, give it one.
mkdir -p /run/systemd/nspawn
if ! mountpoint -q /run/systemd/nspawn && [[ $(stat -f -c %T /run) != tmpfs ]]; then
    mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn
fi
# No machined on the host (no system bus), so no registration; --keep-unit: no scope.
NSPAWN=(systemd-nspawn --quiet --register=no --keep-unit)
RUN_DIR=$MACHINE_DIR.run

# --- the root file system (once) -------------------------------------------------------
if [[ ! -x $MACHINE_DIR/usr/lib/systemd/systemd ]]; then
    say "debootstrap Debian 12 into $MACHINE_DIR"
    rm -rf "$MACHINE_DIR"
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,ca-certificates,python3,python3-venv,procps \
        bookworm "$MACHINE_DIR" "$MIRROR" >"$LOG" 2>&1 || die_with_log "debootstrap"
fi
# The host's way out (a proxy's CA, pip's settings) is what the fetches below need too.
cp /etc/ssl/certs/ca-certificates.crt "$MACHINE_DIR/etc/ssl/certs/ca-certificates.crt"
for conf in /etc/pip.conf /etc/apt/apt.conf.d/*proxy*; do
    [[ -e $conf ]] && cp "$conf" "$MACHINE_DIR$conf"
done
say "Debian packages and Python wheels, fetched with the host's network"
# No service may start while packages are installed into a machine that is not booted.
printf '#!/bin/sh\nexit 101\n' >"$MACHINE_DIR/usr/sbin/policy-rc.d"
chmod 0755 "$MACHINE_DIR/usr/sbin/policy-rc.d"
"${NSPAWN[@]}" -D "$MACHINE_DIR" --pipe --bind-ro="$SRC:/src" bash -euc '
    bash /src/scripts/install-deps.sh
    # fail2ban is installed by install.sh later, offline: its packages wait in the cache.
    POSTWARDEN_DEPS_DOWNLOAD_ONLY=1 bash /src/scripts/install-deps.sh --fail2ban
    python3 -m venv /tmp/venv
    /tmp/venv/bin/pip install -q --upgrade pip
    mkdir /tmp/src
    cp -a /src/pyproject.toml /src/README.md /src/postwarden /src/policyd /src/milterd \
        /src/cli /src/postfix-config /src/dovecot-config /tmp/src/
    /tmp/venv/bin/pip wheel -q -w /wheels pip setuptools wheel /tmp/src
    rm -f /wheels/postwarden-*.whl
' >"$LOG" 2>&1 || die_with_log "packages or wheels inside the machine"
rm -f "$MACHINE_DIR/usr/sbin/policy-rc.d"
rm -rf "$RUN_DIR"
cp -a --reflink=auto "$MACHINE_DIR" "$RUN_DIR"

# --- boot, and act inside --------------------------------------------------------------
leader=
boot() {
    "${NSPAWN[@]}" -D "$RUN_DIR" --boot --private-network --console=passive --bind-ro="$SRC:/src" \
        >>"$LOG" 2>&1 &
    local nspawn=$! deadline=$((SECONDS + 60))
    until leader=$(pgrep -P "$nspawn" -x systemd); do
        ((SECONDS < deadline)) || die "the machine did not boot"
        sleep 0.5
    done
    # Until boot is over (/tmp is mounted then, under whatever is already using it), and
    # "degraded" counts as over: the checks below name anything that is not running.
    local state=
    until [[ $state == running || $state == degraded ]]; do
        ((SECONDS < deadline)) || die_with_log "the machine did not finish booting ($state)"
        sleep 0.5
        state=$(inside systemctl is-system-running 2>/dev/null || true)
    done
    [[ $(inside readlink /proc/1/exe) == */systemd ]] || die "PID 1 inside is not systemd"
    say "booted: systemd is PID 1 inside ($state)"
}
# A clean environment: nothing of the caller's (TMPDIR, a pyenv PATH) leaks inside.
inside() {
    nsenter -t "$leader" -a env -i HOME=/root LANG=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
poweroff() {
    local deadline=$((SECONDS + 60))
    inside systemctl poweroff || true
    while kill -0 "$leader" 2>/dev/null; do
        ((SECONDS < deadline)) || die "the machine did not power off"
        sleep 0.5
    done
}
trap '[[ -n $leader ]] && kill -0 "$leader" 2>/dev/null && poweroff' EXIT

boot
# No network inside: pip takes the wheels fetched above.
install_inside() { inside env PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels bash /src/scripts/install.sh; }
out=$(install_inside) || { echo "$out"; die "scripts/install.sh"; }
echo "$out"
grep -q "service path: systemd (systemd is PID 1)" <<<"$out" \
    || die "install.sh did not take the systemd path"
# A fresh container gets the example config, which turns frontd on.
for unit in postwarden-policyd postwarden-mapd postwarden-milterd postwarden-frontd; do
    inside systemctl is-enabled --quiet "$unit" || die "$unit is not enabled"
    inside systemctl is-active --quiet "$unit" || die "$unit is not running"
    [[ $(inside systemctl show -p User --value "$unit") == postwarden ]] \
        || die "$unit does not run as user postwarden"
done
inside bash /src/vagrant/smoke.sh || die "vagrant/smoke.sh after the install"
out=$(install_inside) || { echo "$out"; die "scripts/install.sh, second run"; }
grep -q "nothing changed" <<<"$out" || { echo "$out"; die "a second install.sh changed something"; }
say "second install.sh: nothing changed"
# SIGKILL each daemon, then each supervisor: serving again with nothing run by hand.
inside bash /src/vagrant/kill_and_recover.sh || die "vagrant/kill_and_recover.sh"

poweroff
boot
for unit in postwarden-policyd postwarden-mapd postwarden-milterd postwarden-frontd postfix@- dovecot; do
    inside systemctl is-active --quiet "$unit" || die "$unit is not running after the reboot"
done
say "after a reboot: postwarden-policyd, -mapd, -milterd, -frontd, postfix and dovecot running"
inside bash /src/vagrant/smoke.sh || die "vagrant/smoke.sh after the reboot"
# Postfix's and Dovecot's lines are in the journal under their units and log names (what
# fail2ban's systemd backend and an operator's journalctl select on).
for match in _SYSTEMD_UNIT=postfix@-.service SYSLOG_IDENTIFIER=postfix/smtpd \
    SYSLOG_IDENTIFIER=postfix/submission/smtpd SYSLOG_IDENTIFIER=postfix/lmtp \
    _SYSTEMD_UNIT=dovecot.service; do
    [[ -n $(inside journalctl --quiet --no-pager -n 1 "$match") ]] \
        || die "no journal lines for $match"
done
inside journalctl --quiet --no-pager SYSLOG_IDENTIFIER=postfix/smtpd | grep -q ": connect from " \
    || die "no postfix/smtpd connect line in the journal"
say "journal: postfix@- (postfix/smtpd, postfix/submission/smtpd, postfix/lmtp) and dovecot lines"

# --- fail2ban on the journal -----------------------------------------------------------
# The example config names the key (fail2ban = false); an older file may not have it.
inside sed -i -e 's/^fail2ban = .*/fail2ban = true/' /etc/postwarden/postwarden.toml
inside grep -q '^fail2ban = true$' /etc/postwarden/postwarden.toml \
    || inside sed -i '/^\[mail\]$/a fail2ban = true' /etc/postwarden/postwarden.toml
out=$(install_inside) || { echo "$out"; die "scripts/install.sh with mail.fail2ban = true"; }
echo "$out"
inside grep -q "^journalmatch = _SYSTEMD_UNIT=postfix@-.service" \
    /etc/fail2ban/jail.d/postwarden.conf || die "the fail2ban jail does not read Postfix's journal"
out=$(install_inside) || { echo "$out"; die "scripts/install.sh, again with fail2ban"; }
grep -q "nothing changed" <<<"$out" \
    || { echo "$out"; die "a second install.sh changed something (fail2ban)"; }
# Loopback is never banned (the jail's ignoreip); for this test 127.0.0.2/.3 may be, and
# two failures are enough.
printf '[%s]\nignoreip =\nmaxretry = 2\n' postwarden-smtp-auth postwarden-imap-pop3 \
    | inside tee /etc/fail2ban/jail.d/postwarden.local >/dev/null
inside fail2ban-client reload >/dev/null || die "fail2ban-client reload"
main_domain=$(inside postwarden --config /etc/postwarden/postwarden.toml \
    config get mail.main_domain)
inside /opt/postwarden/venv/bin/python - "$main_domain" <<'PY' || die "fail2ban did not ban"
"""Fail SMTP AUTH from 127.0.0.2 and IMAP logins from 127.0.0.3, twice each: both banned."""
import base64
import smtplib
import socket
import ssl
import subprocess
import sys
import time

user = f"smoke@{sys.argv[1]}"
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE


def smtp_auth_fails(source: str) -> None:
    with smtplib.SMTP("127.0.0.1", 587, timeout=30, source_address=(source, 0)) as smtp:
        smtp.ehlo("attacker.test")
        smtp.starttls(context=ctx)
        smtp.ehlo("attacker.test")
        token = base64.b64encode(f"\0{user}\0wrong".encode()).decode()
        code, _ = smtp.docmd("AUTH", f"PLAIN {token}")
        assert code == 535, code


def imap_login_fails(source: str) -> None:
    raw = socket.create_connection(("127.0.0.1", 143), timeout=30, source_address=(source, 0))
    raw.recv(1000)
    raw.sendall(b"a STARTTLS\r\n")
    raw.recv(1000)
    with ctx.wrap_socket(raw) as tls:
        tls.sendall(f"b LOGIN {user} wrong\r\n".encode())
        assert b"b NO" in tls.recv(1000)
        tls.sendall(b"c LOGOUT\r\n")
        tls.recv(1000)


def status(jail: str) -> str:
    return subprocess.run(
        ["fail2ban-client", "status", jail], capture_output=True, text=True, check=True
    ).stdout


for _ in range(2):
    smtp_auth_fails("127.0.0.2")
    imap_login_fails("127.0.0.3")
deadline = time.monotonic() + 30
for jail, source in (("postwarden-smtp-auth", "127.0.0.2"), ("postwarden-imap-pop3", "127.0.0.3")):
    while source not in status(jail).split("Banned IP list:")[1]:
        if time.monotonic() > deadline:
            sys.exit(f"systemd-container: {jail} did not ban {source}:\n{status(jail)}")
        time.sleep(0.5)
    print(f"systemd-container: {jail}: {source} banned after 2 failures (journal backend)")
# Banned means refused: 587 from 127.0.0.2 no longer answers, from 127.0.0.1 it does.
try:
    socket.create_connection(("127.0.0.1", 587), timeout=5, source_address=("127.0.0.2", 0))
    sys.exit("systemd-container: 127.0.0.2 still reaches port 587 after its ban")
except OSError:
    pass
socket.create_connection(("127.0.0.1", 587), timeout=5).close()
PY
poweroff
leader=
rm -rf "$RUN_DIR"
say "OK"
