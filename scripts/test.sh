#!/usr/bin/env bash
# Install everything the tests need (Debian packages when missing, Python deps in ./.venv)
# and run the whole suite: ruff, mypy --strict on the package, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
python3 -c "import ensurepip" 2>/dev/null || need_apt+=(python3-venv)
command -v git >/dev/null || need_apt+=(git)
command -v ss >/dev/null || need_apt+=(iproute2)
# The browser the end-to-end tests drive (Playwright never downloads one here).
[ -x /usr/bin/chromium ] || need_apt+=(chromium fonts-dejavu-core)
# The scale-out tests start their own PostgreSQL and Redis servers (tests/services.py).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v redis-server >/dev/null || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev,bench]'
# The benchmark peers the comparison tests run (Mosquitto, Synapse, python-socketio).
bash scripts/bench-peers.sh

echo "== browser: playwright $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("playwright"))'), $(/usr/bin/chromium --version 2>/dev/null)"

echo "== services: $(ls -d /usr/lib/postgresql/*/bin | head -1), $(redis-server --version | cut -d' ' -f1-3)"
# Debian starts the packaged services on install; the tests use their own on free ports.
for svc in postgresql redis-server; do
  service "$svc" stop >/dev/null 2>&1 || true
done

echo "== ruff"
.venv/bin/ruff check src tests
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
