#!/usr/bin/env bash
# A killed daemon serves again without a person: SIGKILL policyd, mapd, milterd and, when
# frontd.enabled, frontd (the children of `postwarden supervise`), then measure until a new
# one runs and Postfix's user can connect to its sockets again. Under systemd, also SIGKILL
# each supervisor (the unit's MainPID): systemd starts it again. Prints each figure; fails
# beyond LIMIT seconds.
# Run as root on the installed appliance (CI runs it after smoke.sh, on both service paths).
set -euo pipefail

BIN=/opt/postwarden/venv/bin/postwarden
PW=("$BIN" --config /etc/postwarden/postwarden.toml)
LIMIT=10  # seconds; the promise is 2 (docs: README "Reliability"), this bounds the wait

say() { echo "kill-and-recover: $*"; }
die() { echo "kill-and-recover: FAIL: $*" >&2; exit 1; }

supervisor_pid() { # daemon
    if [[ -d /run/systemd/system ]]; then
        systemctl show --property MainPID --value "postwarden-$1.service"
    else
        cat "/run/postwarden/$1.pid"
    fi
}
child_pid() { # supervisor pid: the one daemon it runs
    ps -o pid= --ppid "$1" | tr -d ' ' | head -n 1
}
sockets_of() { # daemon
    local key addr
    local keys=(milterd.listen)
    [[ $1 == policyd ]] && keys=(policyd.listen)
    [[ $1 == mapd ]] && keys=(policyd.aliases_listen)
    [[ $1 == frontd ]] && keys=(frontd.milter_listen frontd.sasl_listen)
    for key in "${keys[@]}"; do
        for addr in $("${PW[@]}" config get --lines "$key"); do
            if [[ $addr == unix:* ]]; then echo "${addr#unix:}"; fi
        done
    done
}
postfix_connects() { # socket
    runuser -u postfix -- /usr/bin/python3 -c \
        'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null
}
usec() { echo "${EPOCHREALTIME/./}"; }  # microseconds since the epoch, no bc needed
# Seconds (3 decimals) from `since` (usec) until a new process runs in place of `old` (the
# daemon under its supervisor, or the supervisor itself) and Postfix connects to every socket.
wait_for_recovery() { # daemon since old child|supervisor
    local d=$1 since=$2 old=$3 which=$4 pid sock all elapsed
    while :; do
        elapsed=$(($(usec) - since))
        ((elapsed < LIMIT * 1000000)) || die "$d not serving again within ${LIMIT}s"
        if [[ $which == child ]]; then pid=$(child_pid "$(supervisor_pid "$d")" || true)
        else pid=$(supervisor_pid "$d"); fi
        if [[ -n $pid && $pid != 0 && $pid != "$old" ]]; then
            all=1
            for sock in $(sockets_of "$d"); do postfix_connects "$sock" || { all=0; break; }; done
            if ((all)); then
                elapsed=$(($(usec) - since))
                printf '%d.%03d\n' $((elapsed / 1000000)) $((elapsed % 1000000 / 1000))
                return
            fi
        fi
        sleep 0.05
    done
}

daemons=(policyd mapd milterd)
[[ $("${PW[@]}" config get frontd.enabled) == true ]] && daemons+=(frontd)
for d in "${daemons[@]}"; do
    sup=$(supervisor_pid "$d")
    old=$(child_pid "$sup")
    [[ -n $old ]] || die "$d: no process under its supervisor (pid $sup)"
    since=$(usec)
    kill -KILL "$old"
    took=$(wait_for_recovery "$d" "$since" "$old" child)
    say "$d (pid $old) SIGKILLed: serving again after ${took}s (restarted by postwarden supervise)"
    if [[ -d /run/systemd/system ]]; then
        since=$(usec)
        kill -KILL "$sup"
        took=$(wait_for_recovery "$d" "$since" "$sup" supervisor)
        say "$d's supervisor (pid $sup) SIGKILLed: serving again after ${took}s (restarted by systemd)"
    fi
done
