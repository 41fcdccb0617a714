#!/usr/bin/env bash
# Sourced by run_demo.sh and run_tests.sh, or by a user (`source tools/setup_venv.sh`): create .venv when missing,
# install otfuse into it (with the test extra), and put .venv/bin first on PATH. Reinstalls only when pyproject.toml
# changed. The work runs in a subshell with its own strict options: the sourcing shell keeps its options and
# variables, and gets a non-zero status (never an exit) when the set-up fails.
_otfuse_setup_venv() (
  set -euo pipefail
  root="$1"
  venv="$root/.venv"
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating $venv" >&2
    python3 -m venv "$venv"
  fi
  stamp="$venv/.otfuse-installed"
  want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing otfuse and its dependencies into $venv (first time: a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[dev]"
    echo "$want" > "$stamp"
  fi
)
if _otfuse_setup_venv "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; then
  PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin:$PATH"
  export PATH
  unset -f _otfuse_setup_venv
else
  unset -f _otfuse_setup_venv
  echo "tools/setup_venv.sh: setting up .venv failed (above)" >&2
  false
fi
