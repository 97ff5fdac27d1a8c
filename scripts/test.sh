#!/usr/bin/env bash
# Sets up (scripts/setup_env.sh) and runs the test suite. Extra arguments go to pytest: options
# alone run every test (tests/, pytest.ini's testpaths), test paths replace tests/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
