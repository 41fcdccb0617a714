#!/usr/bin/env bash
# Train the base models: every seed x dataset with the full recipe. Resumes interrupted runs.
#   SEEDS="0 1" DATASETS="cifar10 cifar100" EPOCHS=100 WIDTH=64 NPROC=1 DATA_DIR=~/.cache/otfuse ./run_train_all.sh
set -euo pipefail
cd "$(dirname "$0")"
SEEDS="${SEEDS:-0 1}"
DATASETS="${DATASETS:-cifar10 cifar100}"
EPOCHS="${EPOCHS:-100}"
WIDTH="${WIDTH:-64}"
NPROC="${NPROC:-1}"
DATA_DIR="${DATA_DIR:-$HOME/.cache/otfuse}"
for dataset in $DATASETS; do
  for seed in $SEEDS; do
    args=(train --dataset "$dataset" --width "$WIDTH" --epochs "$EPOCHS" --seed "$seed" --data-dir "$DATA_DIR" --resume)
    if [ "$NPROC" -gt 1 ]; then
      torchrun --standalone --nproc_per_node="$NPROC" -m otfuse "${args[@]}"
    else
      otfuse "${args[@]}"
    fi
  done
done
