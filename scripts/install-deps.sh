#!/usr/bin/env bash
# Install the Debian packages postwarden needs; safe to run again (only what is missing).
#   install-deps.sh             the gateway's own packages
#   install-deps.sh --test      and those the test suite drives (real components it runs
#                               privately on loopback, and the anchor tools of bench/)
#   install-deps.sh --fail2ban  and fail2ban with what its jails need (mail.fail2ban = true)
# No service is started while packages are installed (a policy-rc.d denies it, unless the
# host has its own): scripts/install.sh starts what the gateway runs. The daemons that come
# only with the test packages are left disabled and stopped: the tests start their own.
# POSTWARDEN_DEPS_DOWNLOAD_ONLY=1: only fetch the missing packages into apt's cache (for a
# machine that installs them later without network: vagrant/systemd-container.sh).
set -euo pipefail

RUNTIME_PACKAGES=(
    postfix dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd
    python3 python3-venv python3-dev build-essential libmilter-dev
    openssl ca-certificates logrotate
)
# Without systemd nothing else runs logrotate's daily job.
[[ -d /run/systemd/system ]] || RUNTIME_PACKAGES+=(cron)
# fail2ban-regex proves the jails' filters (tests/integration/scripts/test_fail2ban_filters.py);
# nftables: the fault harness (bench/chaos) cuts DNS off with its namespace's own firewall.
TEST_PACKAGES=(
    redis-server nsd swaks postgrey opendkim opendkim-tools dkimpy-milter faketime iproute2
    fail2ban nftables
)
# The daemons the test packages bring, which their postinst enables (and starts, where no
# policy-rc.d says no). fail2ban is only stopped when this run installed it: on a gateway
# with mail.fail2ban = true it is the real thing (scripts/install.sh enables it).
TEST_ONLY_SERVICES=(redis-server nsd postgrey opendkim dkimpy-milter)
# nftables: the jails' ban action; python3-systemd: reading the journal (systemd path).
FAIL2BAN_PACKAGES=(fail2ban nftables python3-systemd)

test=0
packages=("${RUNTIME_PACKAGES[@]}")
for arg in "$@"; do
    case $arg in
        --test) test=1; packages+=("${TEST_PACKAGES[@]}") ;;
        --fail2ban) packages+=("${FAIL2BAN_PACKAGES[@]}") ;;
        *) echo "install-deps: unknown option $arg (--test, --fail2ban)" >&2; exit 2 ;;
    esac
done

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# A service is off when no runlevel starts it (and, under systemd, no unit is enabled)
# and nothing of it runs.
service_enabled() {
    if [[ -d /run/systemd/system ]]; then
        systemctl is-enabled --quiet "$1" 2>/dev/null
    else
        compgen -G "/etc/rc[2-5].d/S??$1" >/dev/null
    fi
}
service_running() {
    if [[ -d /run/systemd/system ]]; then
        systemctl is-active --quiet "$1" 2>/dev/null
    else
        [[ -x /etc/init.d/$1 ]] && /etc/init.d/"$1" status >/dev/null 2>&1
    fi
}
disable_service() {
    local what=()
    [[ -e /etc/init.d/$1 || -d /run/systemd/system ]] || return 0
    if service_enabled "$1"; then
        if [[ -d /run/systemd/system ]]; then
            systemctl disable --quiet "$1" 2>/dev/null
        else
            update-rc.d "$1" disable >/dev/null 2>&1
        fi
        what+=(disabled)
    fi
    if service_running "$1"; then
        # Its own init script stops it, whatever policy-rc.d says about invoke-rc.d.
        if [[ -d /run/systemd/system ]]; then
            systemctl stop "$1"
        else
            /etc/init.d/"$1" stop >/dev/null 2>&1 </dev/null
        fi
        what+=(stopped)
    fi
    if ((${#what[@]})); then
        echo "install-deps: ${what[*]} $1 (a test package's daemon: the tests run their own)"
    fi
}

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    echo "install-deps: all ${#packages[@]} Debian packages present"
else
    export DEBIAN_FRONTEND=noninteractive
    # Postfix asks how to configure itself; postwarden renders its config: "No configuration".
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # Offline (a machine whose packages were fetched before): the lists and cache at hand.
    apt-get update -qq || echo "install-deps: apt-get update failed; using the lists at hand"
    if [[ ${POSTWARDEN_DEPS_DOWNLOAD_ONLY:-0} == 1 ]]; then
        echo "install-deps: downloading ${missing[*]}"
        apt-get install -y -qq --no-install-recommends --download-only "${missing[@]}" >/dev/null
        exit 0
    fi
    echo "install-deps: installing ${missing[*]}"
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# scripts/install-deps.sh: no service starts meanwhile\nexit 101\n' \
            >"$policy"
        chmod 0755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ((test)); then
    for s in "${TEST_ONLY_SERVICES[@]}"; do disable_service "$s"; done
    for p in "${missing[@]}"; do
        [[ $p == fail2ban ]] && disable_service fail2ban
    done
fi
exit 0
