#!/usr/bin/env bash
# Install Tidings into ./.venv and run the server on the embedded default (SQLite under
# ./tidings-data, no other services). Extra arguments go to `tidings serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e .
exec .venv/bin/tidings serve "$@"
