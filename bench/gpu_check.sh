#!/usr/bin/env bash
# On a CUDA machine: the small workflow on cuda and on the cpu, every figure compared (bench/gpu_check.py).
#   bench/gpu_check.sh                     # digits (bundled): about a minute
#   DATASET=imagefolder:$DATA bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
python3 bench/gpu_check.py --devices "${DEVICES:-cuda,cpu}" --dataset "${DATASET:-digits}" --data-dir /tmp/otfuse-data "$@"
