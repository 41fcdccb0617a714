#!/usr/bin/env bash
# Set up .venv (as run_demo.sh does), lint and format-check the code (ruff), then run the test suite.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick loop).
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_venv.sh
ruff check --quiet . || { echo "ruff check failed: fix the lines above (ruff check --fix fixes some)" >&2; exit 1; }
ruff format --check --quiet . || { echo "ruff format --check failed: run ruff format ." >&2; exit 1; }
# two workers (pytest-xdist), each test file kept on one worker so its module fixtures are built once; one thread
# each, and in every command a test starts (PyTorch's idle threads spin: two of two threads on two cores ran 15% slower);
# the files handed out in the order tests/conftest.py gives them, the long ones first; otfuse's modules compiled once
# for the hundred Python processes the tests start, not in each (where the environment turned bytecode caching off)
unset PYTHONDONTWRITEBYTECODE
OMP_NUM_THREADS=1 python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 "$@"
