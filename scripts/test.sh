#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: Debian packages, a venv with
# postwarden and its test tools, lint, type checks, then pytest (unit, integration, e2e).
# Run as root (it apt-get installs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh --test

VENV=${POSTWARDEN_TEST_VENV:-.venv}
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e '.[test]'

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy --strict"
"$VENV/bin/mypy"
echo "== pytest"
"$VENV/bin/pytest" "$@"
