#!/usr/bin/env bash
# The main job on the embedded `digits` data (no download): train two seeded ResNet18s, fuse them
# with activation- and weight-based OT (with and without REPAIR, and fine-tuned for one epoch),
# print results/summary.md. A few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
source tools/setup_venv.sh
DEMO="--dataset digits --width 16 --epochs 30 --batch-size 64 --lr 0.1 --device cpu"
for seed in 0 1; do
  otfuse train $DEMO --seed "$seed"
done
python run_activation_based_fusion.py --dataset digits --device cpu --finetune-epochs 1
python run_weight_based_fusion.py --dataset digits --device cpu
