#!/usr/bin/env bash
# Undo scripts/install.sh: stop and remove the postwarden daemons, units and venv.
# Keeps the config, the store, the DKIM keys and the service user unless --purge is given.
# Debian's Postfix and Dovecot stay installed; their rendered config still names the
# daemons' sockets, so mail is deferred (never lost) until postwarden is back or Postfix is
# reconfigured.
set -euo pipefail
[[ $EUID -eq 0 ]] || { echo "uninstall: run as root" >&2; exit 1; }
purge=0
[[ ${1:-} == --purge ]] && purge=1

for d in policyd milterd; do
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now "postwarden-$d.service" 2>/dev/null || true
        rm -f "/etc/systemd/system/postwarden-$d.service"
    elif [[ -e /run/postwarden/$d.pid ]]; then
        start-stop-daemon --stop --pidfile "/run/postwarden/$d.pid" --remove-pidfile \
            --retry TERM/15/KILL/5 --oknodo >/dev/null
    fi
    echo "uninstall: stopped $d"
done
[[ -d /run/systemd/system ]] && systemctl daemon-reload
rm -rf /opt/postwarden /run/postwarden
[[ $(readlink /usr/local/bin/postwarden 2>/dev/null) == /opt/postwarden/* ]] \
    && rm -f /usr/local/bin/postwarden
echo "uninstall: removed /opt/postwarden"
if ((purge)); then
    rm -rf /etc/postwarden /var/lib/postwarden /var/spool/postfix/postwarden /var/log/postwarden
    getent passwd postwarden >/dev/null && deluser --quiet --system postwarden 2>/dev/null
    echo "uninstall: purged config, store, keys, logs and the postwarden user"
fi
