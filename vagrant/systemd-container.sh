#!/usr/bin/env bash
# The appliance under a real systemd, where no VM can boot (CI, containers): a Debian 12
# root file system booted by systemd-nspawn with systemd as its PID 1, on a private
# network (loopback only). Inside it, as on the Vagrant box:
#   1. scripts/install.sh must take the systemd path (units installed, enabled, started),
#   2. vagrant/smoke.sh must pass (mail in over 25 and 587, IMAP read back, DKIM verified),
#   3. a second scripts/install.sh must change nothing,
#   4. after a reboot, with nothing run by hand, the gateway is up and smoke.sh passes again.
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
    python3 -m venv /tmp/venv
    /tmp/venv/bin/pip install -q --upgrade pip
    mkdir /tmp/src
    cp -a /src/pyproject.toml /src/README.md /src/postwarden /src/policyd /src/milterd \
        /src/cli /tmp/src/
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
inside() { nsenter -t "$leader" -a "$@"; }
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
for unit in postwarden-policyd postwarden-milterd; do
    inside systemctl is-enabled --quiet "$unit" || die "$unit is not enabled"
    inside systemctl is-active --quiet "$unit" || die "$unit is not running"
    [[ $(inside systemctl show -p User --value "$unit") == postwarden ]] \
        || die "$unit does not run as user postwarden"
done
inside bash /src/vagrant/smoke.sh || die "vagrant/smoke.sh after the install"
out=$(install_inside) || { echo "$out"; die "scripts/install.sh, second run"; }
grep -q "nothing changed" <<<"$out" || { echo "$out"; die "a second install.sh changed something"; }
say "second install.sh: nothing changed"

poweroff
boot
for unit in postwarden-policyd postwarden-milterd postfix@- dovecot; do
    inside systemctl is-active --quiet "$unit" || die "$unit is not running after the reboot"
done
say "after a reboot: postwarden-policyd, postwarden-milterd, postfix and dovecot running"
inside bash /src/vagrant/smoke.sh || die "vagrant/smoke.sh after the reboot"
poweroff
leader=
rm -rf "$RUN_DIR"
say "OK"
