#!/usr/bin/env bash
# Turn a fresh Debian 12 host into the running postwarden gateway:
#   Debian's Postfix + Dovecot (imapd, pop3d, lmtpd), postwarden (a wheel) in a venv at /opt/postwarden,
#   the service user `postwarden`, /etc/postwarden/postwarden.toml (written once, never
#   overwritten), the SQLite store in /var/lib/postwarden, a self-signed TLS pair and a DKIM
#   key when none exist, the Postfix/Dovecot config rendered and applied, and the services
#   running: systemd units when systemd is PID 1, else Debian's init scripts and
#   start-stop-daemon (CI machines, containers). Run as root from a checkout:
#       sudo scripts/install.sh
# Idempotent: a second run changes nothing and says so. postwarden itself is a wheel built
# from the checkout; a run from changed sources upgrades it in place (and says so).
# Environment: POSTWARDEN_HOSTNAME, POSTWARDEN_DOMAIN (first install only; default from
# `hostname -f`), POSTWARDEN_SKIP_DEPS=1 (packages already installed).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/postwarden
VENV=$PREFIX/venv
APP=$PREFIX/src
ETC=/etc/postwarden
CONFIG=$ETC/postwarden.toml
STATE=/var/lib/postwarden
SOCKETS=/var/spool/postfix/postwarden   # inside Postfix's chroot: smtpd/cleanup reach them
RUN=/run/postwarden
LOGS=/var/log/postwarden
USER_NAME=postwarden
BIN=$VENV/bin/postwarden
# mapd serves Postfix's lookup maps (forwarding aliases, mailboxes) apart from policyd, so
# an outage of policyd stops no address resolution (README "Reliability").
DAEMONS=(policyd mapd milterd)
# What `postwarden supervise` runs for each: policyd leaves the maps to mapd.
daemon_args() { if [[ $1 == policyd ]]; then echo "policyd --no-maps"; else echo "$1"; fi; }
# Debian's interpreter, never one from root's PATH (pyenv under /root): the service user
# must be able to run the venv's python.
PYTHON=/usr/bin/python3
umask 022

changes=0
say() { printf 'install: %s\n' "$*"; }
changed() { changes=$((changes + 1)); say "$*"; }
die() { printf 'install: ERROR: %s\n' "$*" >&2; exit 1; }
pw() { "$BIN" --config "$CONFIG" "$@"; }

[[ $EUID -eq 0 ]] || die "run as root (it installs packages, users and services)"
[[ -r /etc/debian_version ]] || die "this installs on Debian 12 (no /etc/debian_version)"

# --- 1. Debian packages -------------------------------------------------------------------
if [[ ${POSTWARDEN_SKIP_DEPS:-0} != 1 ]]; then
    deps_out=$(bash "$SRC/scripts/install-deps.sh")
    printf '%s\n' "$deps_out"
    if grep -q "installing" <<<"$deps_out"; then changes=$((changes + 1)); fi
fi

# --- 2. users and directories ----------------------------------------------------------
if ! getent passwd "$USER_NAME" >/dev/null; then
    adduser --system --group --home "$STATE" --no-create-home --shell /usr/sbin/nologin \
        --quiet "$USER_NAME"
    changed "created service user $USER_NAME"
fi
# Membership of group postfix lets the daemons hand their sockets to Postfix (mode 0660).
if ! id -nG "$USER_NAME" | tr ' ' '\n' | grep -qx postfix; then
    adduser --quiet "$USER_NAME" postfix
    changed "added $USER_NAME to group postfix"
fi
# Dovecot stores every mailbox as this one unprivileged user.
if ! getent passwd vmail >/dev/null; then
    adduser --system --group --home /var/mail/vhosts --no-create-home --shell /usr/sbin/nologin \
        --quiet vmail
    changed "created mail storage user vmail"
fi

ensure_dir() { # path owner group mode (0NNN: any setgid bit is fine, 2NNN: required)
    local path=$1 owner=$2 group=$3 mode=$4 have
    have=$(stat -c '%a' "$path" 2>/dev/null || true)
    # With 0NNN only the permission bits count: a setgid bit inherited from the parent
    # (/var/mail) is fine.
    [[ $mode == 0* ]] && have=${have: -3} && mode=${mode: -3}
    if [[ ! -d $path ]]; then
        install -d -o "$owner" -g "$group" -m "$4" "$path"
        changed "created $path"
    elif [[ $(stat -c '%U:%G' "$path") != "$owner:$group" || $have != "$mode" ]]; then
        chown "$owner:$group" "$path"
        chmod "$mode" "$path"
        changed "fixed owner/mode of $path"
    fi
}
# Traversable: Dovecot reads the users file here; the secrets below have their own modes.
ensure_dir "$ETC" root "$USER_NAME" 0755
ensure_dir "$ETC/dkim" "$USER_NAME" "$USER_NAME" 0700
ensure_dir "$ETC/tls" root root 0755
ensure_dir "$STATE" "$USER_NAME" "$USER_NAME" 0750
# Setgid: the daemons' sockets are born in group postfix, so Postfix is never refused by
# a socket that still has the daemon's own group (the unprivileged milter sets it after).
ensure_dir "$SOCKETS" "$USER_NAME" postfix 2750
ensure_dir "$LOGS" "$USER_NAME" adm 0750
ensure_dir /var/mail/vhosts vmail vmail 0770

# --- mail logs and their rotation ----------------------------------------------------------
# Under systemd, Postfix and Dovecot log to syslog, which journald keeps (journalctl -u
# postfix@- -u dovecot). Without it nothing listens on /dev/log: the rendered config has
# Postfix write /var/log/mail.log (postlogd) and Dovecot /var/log/dovecot.log. Both are
# made here, readable by group adm as Debian's logs are; the daemons append to them.
if [[ ! -d /run/systemd/system ]]; then
    for log in /var/log/mail.log /var/log/dovecot.log; do
        if [[ ! -e $log ]]; then
            install -m 0640 -o root -g adm /dev/null "$log"
            changed "created $log"
        elif [[ $(stat -c '%U:%G %a' "$log") != "root:adm 640" ]]; then
            chown root:adm "$log"
            chmod 0640 "$log"
            changed "fixed owner/mode of $log"
        fi
    done
fi
if ! cmp -s "$SRC/scripts/logrotate/postwarden" /etc/logrotate.d/postwarden; then
    install -m 0644 "$SRC/scripts/logrotate/postwarden" /etc/logrotate.d/postwarden
    changed "installed /etc/logrotate.d/postwarden (dovecot.log, $LOGS/*.log)"
fi
# mail.log: unless another rule (rsyslog's, where rsyslog writes the file) rotates it
# already; logrotate refuses a file named in two rules.
other_rules=()
for f in /etc/logrotate.d/*; do
    [[ $f == /etc/logrotate.d/postwarden* ]] || other_rules+=("$f")
done
if grep -qsE '^[^#]*(^|[[:space:]])/var/log/mail\.log([[:space:]{]|$)' "${other_rules[@]}"; then
    if [[ -e /etc/logrotate.d/postwarden-mail ]]; then
        rm -f /etc/logrotate.d/postwarden-mail
        changed "removed /etc/logrotate.d/postwarden-mail (another rule rotates mail.log)"
    fi
elif ! cmp -s "$SRC/scripts/logrotate/postwarden-mail" /etc/logrotate.d/postwarden-mail; then
    install -m 0644 "$SRC/scripts/logrotate/postwarden-mail" /etc/logrotate.d/postwarden-mail
    changed "installed /etc/logrotate.d/postwarden-mail (mail.log)"
fi

# --- 3. postwarden in its own venv -------------------------------------------------------
# A wheel built from this checkout (templates and the shipped lists are package data), so
# the installed copy is independent of the checkout. Built from a clean copy: nothing a
# build left in the checkout (build/, *.egg-info) can end up in the wheel.
APP_PATHS=()
for p in pyproject.toml README.md postwarden policyd milterd frontd cli postfix-config dovecot-config; do
    [[ -e $SRC/$p ]] && APP_PATHS+=("$p")
done
source_hash() {
    (cd "$SRC" && find "${APP_PATHS[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
        -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -d' ' -f1
}
want=$(source_hash)
have=$(cat "$PREFIX/.source-sha256" 2>/dev/null || true)
# New code, a new key or a changed config: running daemons are restarted to pick it up.
restart_daemons=0
# A venv made by another interpreter (e.g. an earlier run from a pyenv shell) is rebuilt.
if [[ -e $VENV/pyvenv.cfg ]] && ! grep -qx "home = $(dirname "$PYTHON")" "$VENV/pyvenv.cfg"; then
    rm -rf "$VENV"
    changed "removed $VENV (made by another interpreter than $PYTHON)"
fi
# Scratch space for the wheel build and the rendered config, removed on any exit.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# An editable install (what install.sh made before the wheel) is replaced by the wheel.
editable=0
if [[ -x $VENV/bin/pip ]] \
    && "$VENV/bin/pip" show postwarden 2>/dev/null | grep -q '^Editable project location:'; then
    editable=1
fi
if [[ $want != "$have" || ! -x $BIN ]] || ((editable)); then
    install -d -m 0755 "$PREFIX"
    [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
    before=$("$VENV/bin/pip" show postwarden 2>/dev/null | awk '/^Version:/ {print $2}' || true)
    install -d "$WORK/src" "$WORK/dist"
    # cp -a keeps postwarden/appliance/templates/ as links; their targets are copied too.
    (cd "$SRC" && cp -a --parents "${APP_PATHS[@]}" "$WORK/src"/)
    # pyproject.toml names README.md as the long description; the build needs the file.
    [[ -e $WORK/src/README.md ]] || echo "postwarden" >"$WORK/src/README.md"
    find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
    # The wheel's dependencies are installed as pip resolves them; postwarden itself is then
    # reinstalled even at the same version number, so the new code replaces the old in place.
    # pip's build chatter goes to a log, shown only when the install fails.
    wheel=""
    if ! { "$VENV/bin/pip" install --quiet --upgrade pip \
        && "$VENV/bin/pip" wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$WORK/src" \
        && wheel=$(find "$WORK/dist" -name 'postwarden-*.whl' -print -quit) && [[ -n $wheel ]] \
        && "$VENV/bin/pip" install --quiet "$wheel" \
        && "$VENV/bin/pip" install --quiet --force-reinstall --no-deps "$wheel"; } \
        >"$PREFIX/pip.log" 2>&1; then
        cat "$PREFIX/pip.log" >&2
        die "pip install of postwarden failed (log: $PREFIX/pip.log)"
    fi
    # The source copy the editable install ran from is no longer used.
    if [[ -e $APP ]]; then
        rm -rf "$APP"
        say "removed $APP (the editable install's source copy)"
    fi
    echo "$want" >"$PREFIX/.source-sha256"
    restart_daemons=1
    version=$("$BIN" --version | awk '{print $NF}')
    if ((editable)); then
        changed "upgraded postwarden $version in place in $VENV: the wheel" \
            "$(basename "$wheel") replaces the editable install"
    elif [[ -n $before ]]; then
        [[ $before == "$version" ]] && from="new code, same version" || from="was $before"
        changed "upgraded postwarden $version in place in $VENV ($from;" \
            "wheel $(basename "$wheel") built from $SRC)"
    else
        changed "installed postwarden $version into $VENV (wheel $(basename "$wheel"))"
    fi
fi
# The README that the units' Documentation= names.
if [[ -e $SRC/README.md ]] && ! cmp -s "$SRC/README.md" "$PREFIX/README.md"; then
    install -m 0644 "$SRC/README.md" "$PREFIX/README.md"
    changed "installed $PREFIX/README.md"
fi
if [[ $(readlink /usr/local/bin/postwarden 2>/dev/null) != "$BIN" ]]; then
    ln -sfn "$BIN" /usr/local/bin/postwarden
    changed "linked /usr/local/bin/postwarden"
fi

# --- 4. the config (written once) -----------------------------------------------------------
if [[ ! -e $CONFIG ]]; then
    host=${POSTWARDEN_HOSTNAME:-$(hostname -f 2>/dev/null || hostname)}
    [[ $host == *.* ]] || host="$host.localdomain"
    domain=${POSTWARDEN_DOMAIN:-${host#*.}}
    ipv6=true
    # A host (or container) without IPv6 cannot bind [::]: start IPv4-only there.
    [[ -e /proc/net/if_inet6 ]] || ipv6=false
    sed -e "s/@HOSTNAME@/$host/g" -e "s/@DOMAIN@/$domain/g" \
        -e "s/^ipv6 = true$/ipv6 = $ipv6/" \
        "$SRC/scripts/postwarden.toml.example" >"$CONFIG.new"
    chown root:"$USER_NAME" "$CONFIG.new"
    chmod 0640 "$CONFIG.new"
    mv "$CONFIG.new" "$CONFIG"
    changed "wrote $CONFIG (hostname $host, main domain $domain, ipv6 $ipv6)"
fi
pw config check >/dev/null || die "$CONFIG is not valid (see above); fix it and run again"
# frontd (always-up front ends on Postfix's milter and SASL sockets) runs when the config
# turns it on, as the shipped example does; an older config without [frontd] keeps working
# without it. It starts after milterd: Postfix reaches it last.
frontd_enabled=$(pw config get frontd.enabled) || die "cannot read frontd.enabled (config get)"
if [[ $frontd_enabled == true ]]; then DAEMONS+=(frontd); fi
# The daemons read the whole file at start, so a change that renders nothing new for
# Postfix or Dovecot (greylisting, DNSBL, SPF, DKIM keys) still needs them restarted.
config_sum=$(sha256sum "$CONFIG" | cut -d' ' -f1)
[[ $config_sum == "$(cat "$PREFIX/.config-sha256" 2>/dev/null || true)" ]] || restart_daemons=1
# Values come through postwarden's own config model (defaults included), never the TOML.
hostname_cfg=$(pw config get mail.hostname) || die "cannot read mail.hostname (config get)"

# Dovecot's passwd-file of mailbox users: `user@domain:{SCHEME}hash::::::` per line.
if [[ ! -e $ETC/users ]]; then
    install -m 0640 -o root -g dovecot /dev/null "$ETC/users"
    changed "created the (empty) mailbox user file $ETC/users"
fi

# --- 5. TLS pair and DKIM key (only when missing) ------------------------------------------
# Also when mail.hostname changed since: a certificate for another name would be refused.
if [[ ! -s $ETC/tls/self-signed.crt || ! -s $ETC/tls/self-signed.key ]] \
    || ! openssl x509 -noout -checkhost "$hostname_cfg" -in "$ETC/tls/self-signed.crt" \
        | grep -q "does match"; then
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$hostname_cfg" \
        -addext "subjectAltName=DNS:$hostname_cfg" \
        -keyout "$ETC/tls/self-signed.key" -out "$ETC/tls/self-signed.crt" 2>/dev/null
    chmod 0600 "$ETC/tls/self-signed.key"
    chmod 0644 "$ETC/tls/self-signed.crt"
    changed "generated a self-signed certificate for $hostname_cfg"
fi

dkim_keys=$(pw config get dkim.keys --fields domain,selector,algorithm,key) \
    || die "cannot read dkim.keys (config get)"
# Only the keys whose file is missing are generated.
while IFS=$'\t' read -r domain selector algorithm keyfile; do
    [[ -n $domain && ! -e $keyfile ]] || continue
    keydir=$(dirname "$keyfile")
    install -d -o "$USER_NAME" -g "$USER_NAME" -m 0700 "$keydir"
    # keygen writes <dir>/<domain>.<selector>.key (0600); the config may name another file.
    pw dkim keygen "$domain" --selector "$selector" --algorithm "${algorithm%-sha256}" \
        --directory "$keydir" >/dev/null
    made="$keydir/${domain,,}.$selector.key"
    [[ $made == "$keyfile" ]] || mv "$made" "$keyfile"
    chown "$USER_NAME:$USER_NAME" "$keyfile"
    chmod 0600 "$keyfile"
    restart_daemons=1
    changed "generated DKIM key $keyfile ($domain, selector $selector, $algorithm);" \
        "publish the record \`postwarden dkim dns $domain\` prints"
done <<<"$dkim_keys"

# --- 6. Postfix and Dovecot configuration ----------------------------------------------------
# Render to a scratch directory first: when every file already matches what is live, there
# is nothing to apply. Otherwise `config apply` checks (postfix check, doveconf -n), installs
# and reloads; a failing check leaves the running configuration untouched.
scratch=$WORK/rendered
pw config render --to "$scratch" >/dev/null
config_differs=0
while IFS= read -r -d '' f; do
    rel=${f#"$scratch"/}
    live=/etc/${rel}
    cmp -s "$f" "$live" || { config_differs=1; break; }
done < <(find "$scratch" -type f -print0)
# Applied in step 7 once the daemons are up with this config: Postfix is reloaded only when
# the sockets the new main.cf names accept its connections. Turning frontd on reloaded
# Postfix onto frontd's sockets seconds before frontd listened (the other daemons restart
# first), and every submission in between lost its session to smtpd's fatal "no SASL
# authentication mechanisms". Turning it off is the reverse: Postfix leaves frontd's
# sockets before frontd stops.
if ((config_differs)); then restart_daemons=1; fi
apply_rendered_config() {
    if ((config_differs)); then
        apply_out=$(pw config apply 2>&1) || {
            printf '%s\n' "$apply_out" >&2
            die "config apply failed: Postfix and Dovecot still run the configuration they had"
        }
        changed "applied the Postfix/Dovecot configuration: $(tr '\n' ';' <<<"$apply_out")"
    else
        say "Postfix/Dovecot configuration already matches $CONFIG"
    fi
}

# --- 7. services ------------------------------------------------------------------------------
# Postfix must reach the daemons' sockets before it is handed mail: a socket file alone is
# not enough (one left by a killed daemon is there before the new daemon listens), so
# connect as user postfix, which also proves the group and mode let Postfix in.
wait_until_postfix_reaches_daemons() { # hint for the error
    local sock deadline=$((SECONDS + 15))
    local key addr addrs sockets=()
    local keys=(policyd.listen policyd.aliases_listen milterd.listen)
    [[ $frontd_enabled == true ]] && keys+=(frontd.milter_listen frontd.sasl_listen)
    for key in "${keys[@]}"; do
        addrs=$(pw config get --lines "$key") || die "cannot read $key (config get)"
        for addr in $addrs; do
            if [[ $addr == unix:* ]]; then sockets+=("${addr#unix:}"); fi
        done
    done
    for sock in "${sockets[@]}"; do
        until runuser -u postfix -- "$PYTHON" -c \
            'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' \
            "$sock" 2>/dev/null; do
            ((SECONDS < deadline)) || die "Postfix cannot connect to $sock; $1"
            sleep 0.2
        done
    done
}

# The pid file's process runs our supervisor and is not a zombie. start-stop-daemon
# --status counts any process with that PID: a zombie (left where PID 1 reaps nothing) or
# an unrelated process that reused the PID of one killed.
runs_our() { # pid file, word its command line must hold (supervise, or a daemon's name)
    local pid cmdline
    [[ -r $1 ]] && read -r pid <"$1" && [[ $pid =~ ^[1-9][0-9]*$ ]] || return 1
    [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]] || return 1
    { cmdline=$(tr '\0' '\n' <"/proc/$pid/cmdline"); } 2>/dev/null || return 1
    grep -qxF "$BIN" <<<"$cmdline" && grep -qxF "$2" <<<"$cmdline"
}
supervisor_running() { runs_our "$1" supervise; }

# No core dumps from the processes that see passwords: Dovecot's auth and login processes
# and Postfix's smtpd. Their masters run with RLIMIT_CORE 0, soft and hard, and every
# process a master starts inherits it (only root may raise a hard limit again; neither
# does, and vagrant/smoke.sh checks every process of both).
# Under systemd a drop-in (LimitCORE=0) sets it, else install.sh starts them under
# `ulimit -c 0`. A master already running with another limit is restarted once.
# Reloads (`postwarden config apply`) signal the running master, which keeps its limit.
NOCORE_DROPINS=(dovecot.service postfix@.service)
without_core_dumps() { (ulimit -c 0 && "$@"); }  # a command or a function
master_pid() { # dovecot|postfix: the PID in its master's own pid file, if that runs it
    local file program pid
    if [[ $1 == postfix ]]; then
        file=$(postconf -h queue_directory)/pid/master.pid program=/usr/lib/postfix/sbin/master
    else
        file=$(doveconf -h base_dir 2>/dev/null)/master.pid program=/usr/sbin/dovecot
    fi
    # Postfix pads its pid with blanks; read trims them.
    [[ -r $file ]] && read -r pid <"$file" && [[ $pid =~ ^[1-9][0-9]*$ ]] || return 1
    { tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 1 | grep -qxF "$program"; } 2>/dev/null \
        || return 1
    echo "$pid"
}
core_dumps_closed() { # dovecot|postfix: its master runs with RLIMIT_CORE 0, soft and hard
    local pid
    pid=$(master_pid "$1") || return 1
    awk '$1 == "Max" && $2 == "core" { found = 1; closed = ($5 == "0" && $6 == "0") }
        END { exit !(found && closed) }' "/proc/$pid/limits" 2>/dev/null
}
# Just started: the master writes its pid file a moment after the start command returns.
require_core_dumps_closed() { # dovecot|postfix, hint for the error
    local deadline=$((SECONDS + 15)) pid
    until core_dumps_closed "$1"; do
        if ((SECONDS >= deadline)); then
            pid=$(master_pid "$1") || die "$1: no running master found after its start; $2"
            die "$1's master (pid $pid) may write core dumps:" \
                "$(grep '^Max core' "/proc/$pid/limits" 2>/dev/null); $2"
        fi
        sleep 0.2
    done
}

if [[ -d /run/systemd/system ]]; then
    say "service path: systemd (systemd is PID 1)"
    units_changed=0
    for d in "${DAEMONS[@]}"; do
        unit=postwarden-$d.service
        if ! cmp -s "$SRC/scripts/systemd/$unit" "/etc/systemd/system/$unit"; then
            install -m 0644 "$SRC/scripts/systemd/$unit" "/etc/systemd/system/$unit"
            units_changed=1
            changed "installed /etc/systemd/system/$unit"
        fi
    done
    for base in "${NOCORE_DROPINS[@]}"; do
        dropin=/etc/systemd/system/$base.d/postwarden-nocore.conf
        if ! cmp -s "$SRC/scripts/systemd/postwarden-nocore.conf" "$dropin"; then
            install -d -m 0755 "$(dirname "$dropin")"
            install -m 0644 "$SRC/scripts/systemd/postwarden-nocore.conf" "$dropin"
            units_changed=1
            changed "installed $dropin (LimitCORE=0: no core dumps)"
        fi
    done
    if ((units_changed)); then systemctl daemon-reload; fi
    # Debian's postfix.service is a oneshot that stays "active" even when its instance
    # (postfix@-) failed, e.g. before any main.cf existed: ask Postfix itself.
    running() {
        if [[ $1 == postfix ]]; then postfix status >/dev/null 2>&1
        else systemctl is-active --quiet "$1"; fi
    }
    ensure_unit() { # enabled and running; postwarden's own restarted for new code or config
        local unit=$1
        if ! systemctl is-enabled --quiet "$unit"; then
            systemctl enable --quiet "$unit"
            changed "enabled $unit"
        fi
        if ! running "$unit"; then
            systemctl restart "$unit"
            running "$unit" || die "$unit did not start: see journalctl -u $unit"
            changed "started $unit"
        elif ((restart_daemons || units_changed)) && [[ $unit == postwarden-* ]]; then
            systemctl restart "$unit"
            changed "restarted $unit (new code, key, config or unit)"
        fi
    }
    for unit in "${DAEMONS[@]/#/postwarden-}"; do ensure_unit "$unit"; done
    wait_until_postfix_reaches_daemons "see journalctl ${DAEMONS[*]/#/-u postwarden-}"
    # The daemons are up: now Postfix may be pointed at their sockets (and off frontd's).
    apply_rendered_config
    if [[ $frontd_enabled != true ]] && systemctl is-enabled --quiet postwarden-frontd 2>/dev/null; then
        systemctl disable --now --quiet postwarden-frontd
        changed "stopped and disabled postwarden-frontd (frontd.enabled is false)"
    fi
    for unit in dovecot postfix; do ensure_unit "$unit"; done
    # Started before the drop-in existed (at boot, or by the package's own postinst): the
    # limit applies from the next start on. Postfix's master runs under postfix@-.
    for svc in dovecot postfix; do
        unit=$svc.service
        if [[ $svc == postfix ]]; then unit=postfix@-.service; fi
        if ! core_dumps_closed "$svc"; then
            systemctl restart "$unit"
            changed "restarted $unit: its master ran with core dumps allowed (now LimitCORE=0)"
        fi
        require_core_dumps_closed "$svc" "see systemctl cat $unit"
    done
else
    say "service path: no systemd (PID 1 is $(ps -o comm= -p 1)); Debian init scripts + start-stop-daemon"
    ensure_dir "$RUN" root root 0755
    # Each daemon runs under `postwarden supervise`, which starts it again within a second
    # when it dies (and backs off when it keeps dying); the pid file holds the supervisor's.
    for d in "${DAEMONS[@]}"; do
        pidfile=$RUN/$d.pid
        if supervisor_running "$pidfile"; then
            ((restart_daemons)) || continue
            start-stop-daemon --stop --pidfile "$pidfile" --remove-pidfile --retry TERM/35/KILL/5
            say "stopped $d (new code, key or config)"
        elif runs_our "$pidfile" "$d"; then
            # An earlier install's daemon, started without a supervisor.
            start-stop-daemon --stop --pidfile "$pidfile" --remove-pidfile --retry TERM/35/KILL/5
            say "stopped $d (started without a supervisor by an earlier install)"
        fi
        # A crash leaves the pid file behind, naming a dead process or, where PID 1 reaps
        # nothing, a zombie: start-stop-daemon would take either for a running daemon.
        rm -f "$pidfile"
        start-stop-daemon --start --background --make-pidfile --pidfile "$pidfile" \
            --chuid "$USER_NAME:$USER_NAME" --umask 0007 --output "$LOGS/$d.log" \
            --startas "$BIN" -- --config "$CONFIG" supervise $(daemon_args "$d")
        changed "started $d as $USER_NAME under postwarden supervise (pid $(cat "$pidfile"), log $LOGS/$d.log)"
    done
    for d in "${DAEMONS[@]}"; do
        supervisor_running "$RUN/$d.pid" \
            || die "$d's supervisor exited at start; see $LOGS/$d.log: $(tail -n 5 "$LOGS/$d.log")"
    done
    wait_until_postfix_reaches_daemons "see $LOGS/<daemon>.log"
    # The daemons are up: now Postfix may be pointed at their sockets (and off frontd's).
    apply_rendered_config
    if [[ $frontd_enabled != true ]] && supervisor_running "$RUN/frontd.pid"; then
        start-stop-daemon --stop --pidfile "$RUN/frontd.pid" --remove-pidfile --retry TERM/35/KILL/5
        changed "stopped frontd (frontd.enabled is false)"
    fi
    # The daemons these start must not inherit our stdout/stderr (a caller's pipe would
    # never close), so their words go to a log that is shown when a start fails.
    # Both start under `ulimit -c 0` (no core dumps, see without_core_dumps); one already
    # running with another limit (started by its package, or by hand) is restarted so.
    init_script() { # dovecot|postfix, start|restart
        if [[ $1 == dovecot ]]; then service dovecot "$2"; else /etc/init.d/postfix "$2"; fi
    }
    for svc in dovecot postfix; do
        if ! /etc/init.d/$svc status >/dev/null 2>&1; then
            without_core_dumps init_script "$svc" start >"$LOGS/init.log" 2>&1 </dev/null \
                || die "$svc did not start: $(cat "$LOGS/init.log")"
            changed "started $svc (init script, no core dumps)"
        elif ! core_dumps_closed "$svc"; then
            without_core_dumps init_script "$svc" restart >"$LOGS/init.log" 2>&1 </dev/null \
                || die "$svc did not restart: $(cat "$LOGS/init.log")"
            changed "restarted $svc: its master ran with core dumps allowed (now ulimit -c 0)"
        fi
        hint="it was started with ulimit -c 0 by /etc/init.d/$svc"
        if [[ $svc == dovecot ]] && grep -qs '^[[:space:]]*ALLOW_COREDUMPS=1' /etc/default/dovecot
        then
            hint="/etc/default/dovecot sets ALLOW_COREDUMPS=1: its init script raises the limit"
        fi
        require_core_dumps_closed "$svc" "$hint"
    done
fi

# logrotate's daily run: systemd's logrotate.timer, else cron's /etc/cron.daily.
if [[ -d /run/systemd/system ]]; then
    if ! systemctl is-enabled --quiet logrotate.timer \
        || ! systemctl is-active --quiet logrotate.timer; then
        systemctl enable --now --quiet logrotate.timer
        changed "enabled logrotate.timer"
    fi
elif ! /etc/init.d/cron status >/dev/null 2>&1; then
    service cron start >"$LOGS/init.log" 2>&1 </dev/null \
        || die "cron (runs logrotate daily) did not start: $(cat "$LOGS/init.log")"
    changed "started cron (runs logrotate daily)"
fi

# --- 8. fail2ban (mail.fail2ban) ---------------------------------------------------------------
# Jails for SMTP AUTH and IMAP/POP3 login failures, reading what this service path logs:
# the files above, or the journal. The key is read through postwarden itself.
JAIL=/etc/fail2ban/jail.d/postwarden.conf
fail2ban_running() {
    if [[ -d /run/systemd/system ]]; then systemctl is-active --quiet fail2ban
    else /etc/init.d/fail2ban status >/dev/null 2>&1; fi
}
fail2ban_enabled() {
    if [[ -d /run/systemd/system ]]; then systemctl is-enabled --quiet fail2ban 2>/dev/null
    else compgen -G "/etc/rc[2-5].d/S??fail2ban" >/dev/null; fi
}
want_fail2ban=$(pw config get mail.fail2ban) || die "cannot read mail.fail2ban (config get)"
if [[ $want_fail2ban == true ]]; then
    if [[ ${POSTWARDEN_SKIP_DEPS:-0} != 1 ]]; then
        deps_out=$(bash "$SRC/scripts/install-deps.sh" --fail2ban)
        if grep -q "installing" <<<"$deps_out"; then changed "${deps_out#install-deps: }"; fi
        # Installed for mail.fail2ban: ours to switch off again when it goes back to false.
        if grep -q "installing.* fail2ban" <<<"$deps_out"; then
            touch "$PREFIX/.fail2ban-enabled"
        fi
    fi
    command -v fail2ban-client >/dev/null || die "mail.fail2ban = true, but no fail2ban installed"
    ports() { local k out=(); for k in "$@"; do out+=("$(pw config get "mail.$k")"); done
        local IFS=,; echo "${out[*]}"; }
    if [[ -d /run/systemd/system ]]; then
        service_path="systemd: Postfix and Dovecot log to the journal"
        # Debian 12 runs Postfix as the instance unit postfix@-.service; the stock filter
        # names postfix.service, which logs nothing.
        postfix_log=$'backend      = systemd\njournalmatch = _SYSTEMD_UNIT=postfix@-.service'
        dovecot_log='backend      = systemd'
    else
        service_path="no systemd: Postfix and Dovecot log to files"
        postfix_log=$'backend   = auto\nlogpath   = /var/log/mail.log'
        dovecot_log=$'backend   = auto\nlogpath   = /var/log/dovecot.log'
    fi
    jail=$(<"$SRC/scripts/fail2ban/postwarden.conf")
    jail=${jail//@SERVICE_PATH@/$service_path}
    jail=${jail//@SMTP_PORTS@/$(ports smtp_port submission_port smtps_port)}
    jail=${jail//@IMAP_POP3_PORTS@/$(ports imap_port imaps_port pop3_port pop3s_port)}
    jail=${jail//@POSTFIX_LOG@/$postfix_log}
    jail=${jail//@DOVECOT_LOG@/$dovecot_log}
    # Debian 12's own sshd jail (jail.d/defaults-debian.conf) reads /var/log/auth.log, which
    # only a syslog daemon writes; without the file fail2ban refuses to start at all. The
    # journal has sshd's lines; without systemd nothing has them, so that jail cannot work.
    if [[ ! -e /var/log/auth.log ]] \
        && grep -qs '^enabled *= *true' /etc/fail2ban/jail.d/defaults-debian.conf; then
        if [[ -d /run/systemd/system ]]; then
            jail+=$'\n\n# No /var/log/auth.log (no rsyslog): sshd logs to the journal.'
            jail+=$'\n[sshd]\nbackend = systemd'
        else
            jail+=$'\n\n# No syslog daemon writes /var/log/auth.log here: Debian\'s sshd jail'
            jail+=$'\n# would keep fail2ban from starting.\n[sshd]\nenabled = false'
        fi
    fi
    fail2ban_changed=0
    printf '%s\n' "$jail" >"$JAIL.new"
    if cmp -s "$JAIL.new" "$JAIL"; then
        rm -f "$JAIL.new"
    else
        chmod 0644 "$JAIL.new"
        mv "$JAIL.new" "$JAIL"
        fail2ban_changed=1
        changed "installed $JAIL (jails postwarden-smtp-auth, postwarden-imap-pop3)"
    fi
    if ! fail2ban_enabled; then
        if [[ -d /run/systemd/system ]]; then systemctl enable --quiet fail2ban
        else update-rc.d fail2ban enable >/dev/null 2>&1 \
            || update-rc.d fail2ban defaults >/dev/null; fi
        # Ours to switch off again when mail.fail2ban goes back to false.
        touch "$PREFIX/.fail2ban-enabled"
        changed "enabled fail2ban"
    fi
    if ! fail2ban_running; then
        if [[ -d /run/systemd/system ]]; then systemctl start fail2ban
        else service fail2ban start >"$LOGS/init.log" 2>&1 </dev/null || true; fi
        changed "started fail2ban"
    elif ((fail2ban_changed)); then
        reload_out=$(fail2ban-client reload 2>&1) || die "fail2ban-client reload: $reload_out"
        say "reloaded fail2ban"
    fi
    # Up, and both jails read their logs.
    deadline=$((SECONDS + 30))
    until fail2ban-client status postwarden-smtp-auth >/dev/null 2>&1 \
        && fail2ban-client status postwarden-imap-pop3 >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "fail2ban does not run the postwarden jails:" \
            "$(tail -n 5 /var/log/fail2ban.log 2>/dev/null)"
        sleep 0.5
    done
elif [[ -e $JAIL ]]; then
    rm -f "$JAIL"
    if [[ -e $PREFIX/.fail2ban-enabled ]]; then
        # Nobody ran fail2ban before mail.fail2ban did: back to that.
        if [[ -d /run/systemd/system ]]; then systemctl disable --now --quiet fail2ban
        else update-rc.d fail2ban disable >/dev/null 2>&1
            /etc/init.d/fail2ban stop >/dev/null 2>&1 </dev/null || true; fi
        rm -f "$PREFIX/.fail2ban-enabled"
        changed "removed $JAIL and stopped fail2ban (mail.fail2ban = false)"
    else
        if fail2ban_running && ! reload_out=$(fail2ban-client reload 2>&1); then
            say "WARNING: fail2ban-client reload failed: $reload_out"
        fi
        changed "removed $JAIL (mail.fail2ban = false)"
    fi
fi

# Recorded only now: the daemons have been (re)started with this config.
echo "$config_sum" >"$PREFIX/.config-sha256"

if ((changes == 0)); then
    say "nothing changed: postwarden is already installed and running"
else
    say "done: $changes change(s); the gateway is running (config: $CONFIG)"
fi
