#!/usr/bin/env bash
# Install the Debian packages postwarden needs (and, with --test, those its test suite drives).
# Safe to run again: apt-get only installs what is missing.
set -euo pipefail

RUNTIME_PACKAGES=(
    postfix dovecot-core dovecot-imapd dovecot-pop3d dovecot-lmtpd
    python3 python3-venv python3-dev build-essential libmilter-dev
    openssl ca-certificates
)
# Real components the tests run privately on loopback, and the anchor tools of bench/.
TEST_PACKAGES=(redis-server nsd swaks postgrey opendkim opendkim-tools dkimpy-milter faketime iproute2)

packages=("${RUNTIME_PACKAGES[@]}")
[[ "${1:-}" == "--test" ]] && packages+=("${TEST_PACKAGES[@]}")

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
    echo "install-deps: all ${#packages[@]} Debian packages present"
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Postfix asks how to configure itself; postwarden renders its config, so take "No configuration".
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
