#!/usr/bin/env bash
# Start a shell in the otfuse image with all GPUs, the repository (checkpoint/ and results/ inside it)
# and the data dir mounted:  DATA_DIR=~/.cache/otfuse ./run_container.sh [tag] [command...]
set -euo pipefail
cd "$(dirname "$0")"
tag="${1:-otfuse:latest}"; shift || true
data="${DATA_DIR:-$HOME/.cache/otfuse}"
mkdir -p "$data" checkpoint results
docker run --rm -it --gpus all --ipc=host \
  -v "$PWD":/workspace/otfuse \
  -v "$PWD/checkpoint":/workspace/otfuse/checkpoint \
  -v "$PWD/results":/workspace/otfuse/results \
  -v "$data":/data \
  "$tag" "${@:-bash}"
