#!/usr/bin/env bash
# Set up .venv (as run_demo.sh does), then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_venv.sh
python -m pytest -q --durations=15 "$@"
