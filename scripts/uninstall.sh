#!/usr/bin/env bash
# Undo scripts/install.sh: stop and remove the postwarden daemons, units, venv, logrotate
# rules and fail2ban jails.
# Keeps the config, the store, the DKIM keys and the service user unless --purge is given.
# Debian's Postfix and Dovecot stay installed; their rendered config still names the
# daemons' sockets, so mail is deferred (never lost) until postwarden is back or Postfix is
# reconfigured.
set -euo pipefail
[[ $EUID -eq 0 ]] || { echo "uninstall: run as root" >&2; exit 1; }
purge=0
[[ ${1:-} == --purge ]] && purge=1

for d in frontd policyd mapd milterd; do
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now "postwarden-$d.service" 2>/dev/null || true
        rm -f "/etc/systemd/system/postwarden-$d.service"
    elif [[ -e /run/postwarden/$d.pid ]]; then
        start-stop-daemon --stop --pidfile "/run/postwarden/$d.pid" --remove-pidfile \
            --retry TERM/15/KILL/5 --oknodo >/dev/null
    fi
    echo "uninstall: stopped $d"
done
# install.sh's LimitCORE=0 drop-ins (no core dumps from Dovecot's and Postfix's masters):
# the running masters keep the limit until their next start.
for base in dovecot.service postfix@.service; do
    dropin=/etc/systemd/system/$base.d/postwarden-nocore.conf
    if [[ -e $dropin ]]; then
        rm -f "$dropin"
        rmdir --ignore-fail-on-non-empty "$(dirname "$dropin")"
        echo "uninstall: removed $dropin"
    fi
done
[[ -d /run/systemd/system ]] && systemctl daemon-reload
# The fail2ban jails (mail.fail2ban); fail2ban itself stops too when install.sh started it.
if [[ -e /etc/fail2ban/jail.d/postwarden.conf ]]; then
    rm -f /etc/fail2ban/jail.d/postwarden.conf
    if [[ -e /opt/postwarden/.fail2ban-enabled ]]; then
        if [[ -d /run/systemd/system ]]; then
            systemctl disable --now --quiet fail2ban 2>/dev/null || true
        else
            update-rc.d fail2ban disable >/dev/null 2>&1 || true
            /etc/init.d/fail2ban stop >/dev/null 2>&1 </dev/null || true
        fi
    elif fail2ban-client ping >/dev/null 2>&1; then
        fail2ban-client reload >/dev/null 2>&1 || echo "uninstall: WARNING: fail2ban reload failed"
    fi
    echo "uninstall: removed the fail2ban jails"
fi
rm -f /etc/logrotate.d/postwarden /etc/logrotate.d/postwarden-mail
rm -rf /opt/postwarden /run/postwarden
[[ $(readlink /usr/local/bin/postwarden 2>/dev/null) == /opt/postwarden/* ]] \
    && rm -f /usr/local/bin/postwarden
echo "uninstall: removed /opt/postwarden"
if ((purge)); then
    # /var/log/mail.log and dovecot.log stay: they are Postfix's and Dovecot's.
    rm -rf /etc/postwarden /var/lib/postwarden /var/spool/postfix/postwarden /var/log/postwarden
    getent passwd postwarden >/dev/null && deluser --quiet --system postwarden 2>/dev/null
    echo "uninstall: purged config, store, keys, logs and the postwarden user"
fi
