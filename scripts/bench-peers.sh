#!/usr/bin/env bash
# Install the peers `tidings bench compare` measures Tidings against, each in its own
# place, nothing of theirs in this repository:
#   - Mosquitto from Debian's package (the bench runs its own instance on a free port);
#   - Matrix Synapse from PyPI in its own virtual environment;
#   - python-socketio (on aiohttp + uvloop) from PyPI in its own virtual environment;
#   - matplotlib in ./.venv (the bench draws its plots with it).
# The peers' environments go to $TIDINGS_PEERS_DIR (default ~/.cache/tidings-peers).
# Safe to run again: what is there already is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
peers="${TIDINGS_PEERS_DIR:-$HOME/.cache/tidings-peers}"
mkdir -p "$peers"

SYNAPSE_VERSION="1.163.2"
SOCKETIO_VERSION="5.18.1"

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
# Debian starts the packaged broker on install; the bench runs its own.
service mosquitto stop >/dev/null 2>&1 || true

venv() {  # venv NAME PACKAGE...
  local dir="$peers/$1"; shift
  if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c 'import sys; sys.exit(0)'; then
    python3 -m venv "$dir"
  fi
  "$dir/bin/pip" install -q --disable-pip-version-check "$@"
}
venv synapse "matrix-synapse==$SYNAPSE_VERSION"
venv socketio "python-socketio==$SOCKETIO_VERSION" "aiohttp>=3.12,<4" "uvloop>=0.19,<1"

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[bench]'

echo "== peers in $peers: synapse $("$peers/synapse/bin/python" -c 'import synapse; print(synapse.__version__)'), python-socketio $("$peers/socketio/bin/python" -c 'import importlib.metadata as m; print(m.version("python-socketio"))'), $( (mosquitto -h 2>/dev/null || /usr/sbin/mosquitto -h 2>/dev/null || true) | head -1)"
