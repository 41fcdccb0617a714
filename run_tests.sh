#!/usr/bin/env bash
# Set up .venv (as run_demo.sh does), then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_venv.sh
# two workers (pytest-xdist), each test file kept on one worker so its module fixtures are built once
python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
