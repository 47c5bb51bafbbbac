#!/usr/bin/env bash
# The whole comparison in one command: install the peers (scripts/bench-peers.sh), run
# `tidings bench compare` (every scenario, Tidings and the peers side by side, about
# 12 minutes on a 2-core machine) and rewrite the tables and plots of
# docs/benchmarks.md ("Side by side with the peers"). Results: bench-results/compare/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bench-peers.sh
exec .venv/bin/tidings bench compare --out bench-results/compare --docs docs/benchmarks.md "$@"
