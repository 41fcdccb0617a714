#!/usr/bin/env bash
# On one GPU, within 10 minutes: two width-64 ResNet18 seeds on the CIFAR-10 JPEG copy, then both
# fusion scripts (each reports the default fusion with the refit, the average alone, the average + REPAIR,
# vanilla + refit, and fusion + 1 epoch of fine-tuning);
# prints results/summary.md and the phase times.
#   EPOCHS=15 DATA=../shared/data/cifar10-jpeg.tar.xz bench/gpu_headline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
EPOCHS="${EPOCHS:-15}"
CK=/tmp/otfuse-headline-ck
RES="${RESULTS:-results}"
for seed in 0 1; do
  python3 -m otfuse train --dataset "imagefolder:$DATA" --width 64 --epochs "$EPOCHS" --batch-size 512 --lr 0.4 \
    --seed "$seed" --data-dir /tmp/otfuse-data --checkpoint-dir "$CK" --device cuda
done
python3 run_activation_based_fusion.py --checkpoint-dir "$CK" --results-dir "$RES" --data-dir /tmp/otfuse-data --device cuda --finetune-epochs 1
python3 run_weight_based_fusion.py --checkpoint-dir "$CK" --results-dir "$RES" --data-dir /tmp/otfuse-data --device cuda
grep -h "" "$RES"/*_activation.csv "$RES"/*_weight.csv
