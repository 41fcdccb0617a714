#!/usr/bin/env bash
# Train the base models: every seed x dataset with the full recipe. Resumes interrupted runs.
#   SEEDS="0 1" DATASETS="cifar10 cifar100" EPOCHS=100 WIDTH=64 NPROC=1 DATA_DIR=~/.cache/otfuse ./run_train_all.sh
# DATA_DIR defaults to $OTFUSE_DATA_DIR (the data dir the container mounts and the fusion scripts read), else ~/.cache/otfuse.
# Parties that each train on part of the data, per seed (the fusion scripts then fuse complementary parties):
#   SPLIT=disjoint ./run_train_all.sh           # party A on the first half of the classes, party B on the second
#   SPLIT=biased BIAS=0.8 ./run_train_all.sh    # A: 80% of the first half's images and 20% of the rest's; B the others
# K parties per seed, each on its part of a partition of every class's images (otfuse train --partition):
#   SPLIT=dirichlet PARTIES=4 ALPHA=0.5 ./run_train_all.sh   # label skew, as Flower Datasets' DirichletPartitioner
#   SPLIT=iid PARTIES=4 ./run_train_all.sh                   # or SPLIT=classes: disjoint blocks of classes
# The parties of one seed start from one shared initialisation (the federated norm: the seed's); INIT=own gives each
# party its own (--init-seed seed * 1000 + party).
set -euo pipefail
cd "$(dirname "$0")"
SEEDS="${SEEDS:-0 1}"
DATASETS="${DATASETS:-cifar10 cifar100}"
EPOCHS="${EPOCHS:-100}"
WIDTH="${WIDTH:-64}"
NPROC="${NPROC:-1}"
DATA_DIR="${DATA_DIR:-${OTFUSE_DATA_DIR:-$HOME/.cache/otfuse}}"
SPLIT="${SPLIT:-}"
BIAS="${BIAS:-0.8}"
PARTIES="${PARTIES:-4}"
ALPHA="${ALPHA:-0.5}"
INIT="${INIT:-shared}"
for var in EPOCHS WIDTH NPROC PARTIES; do
  case "${!var}" in
    "" | *[!0-9]*) echo "run_train_all.sh: $var=${!var} is not a whole number; e.g. $var=1" >&2; exit 2 ;;
  esac
done
case "$SPLIT" in
  "" | disjoint | biased | iid | classes | dirichlet) ;;
  *) echo "run_train_all.sh: SPLIT=$SPLIT: use disjoint, biased, iid, classes, dirichlet or leave it unset (every seed on all the data)" >&2; exit 2 ;;
esac
case "$INIT" in
  shared | own) ;;
  *) echo "run_train_all.sh: INIT=$INIT: use shared (one initialisation per seed) or own (one per party)" >&2; exit 2 ;;
esac
for dataset in $DATASETS; do
  parts=("")
  if [ "$SPLIT" = iid ] || [ "$SPLIT" = classes ] || [ "$SPLIT" = dirichlet ]; then
    parts=()
    for ((party = 1; party <= PARTIES; party++)); do
      part="--partition $SPLIT --parties $PARTIES --party $party"
      [ "$SPLIT" = dirichlet ] && part+=" --alpha $ALPHA"
      parts+=("$part")
    done
  elif [ -n "$SPLIT" ]; then
    # through otfuse's error handling: a bad dataset name or path is one line and exit code 2, not a traceback
    n=$(python -c "import sys; from otfuse.errors import run_main; from otfuse.data import load_dataset
sys.exit(run_main(lambda: print(load_dataset(sys.argv[1], sys.argv[2]).num_classes) or 0))" "$dataset" "$DATA_DIR")
    half=$((n / 2))
    bias=()
    [ "$SPLIT" = biased ] && bias=(--bias "$BIAS")
    parts=("--classes 0-$((half - 1)) ${bias[*]}" "--classes $half-$((n - 1)) ${bias[*]}")
  fi
  for seed in $SEEDS; do
    for part in "${parts[@]}"; do
      if [ "$INIT" = own ] && [[ "$part" == --partition* ]]; then
        party="${part##*--party }"
        part+=" --init-seed $((seed * 1000 + ${party%% *}))"
      fi
      # shellcheck disable=SC2206  # a part is a few words of options, split on purpose
      args=(train --dataset "$dataset" --width "$WIDTH" --epochs "$EPOCHS" --seed "$seed" --data-dir "$DATA_DIR" --resume $part)
      if [ "$NPROC" -gt 1 ]; then
        torchrun --standalone --nproc_per_node="$NPROC" -m otfuse "${args[@]}"
      else
        otfuse "${args[@]}"
      fi
    done
  done
done
