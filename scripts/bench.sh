#!/usr/bin/env bash
# Sets up (scripts/setup_env.sh) and runs the benchmark, the project's main job.
# Extra arguments go to benchmarks/run.py (see --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" benchmarks/run.py "$@"
