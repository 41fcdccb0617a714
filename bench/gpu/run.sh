#!/usr/bin/env bash
# The one command for the GPU machine, after bench/gpu/prepare.sh here (docs/speed.md, "On a GPU"):
#   bench/gpu/run.sh                       # the check on cuda and cpu, then the seed's CIFAR-10 row (ResNet18 width 64)
#   bench/gpu/run.sh --dataset cifar100    # the CIFAR-100 row, on the JPEG copy (prepare.sh --dataset cifar100 first)
#   bench/gpu/run.sh --device cpu --tiny   # the dry run here: every stage on the CPU at tiny sizes
# Options: --epochs N (default 50: the recipe of the shared width-64 pair), --stages install,check,train,fuse.
# Stages: install (the carried wheels into a temporary site, the carried data verified), check (bench/gpu_check.py:
# the digits workflow on cuda and cpu, maps identical, weights close, accuracies), train (two seeds), fuse (both
# fusion scripts). Everything goes under $OUT (default results/gpu-run) as it is made: run.log, stages.csv (seconds
# per stage), gpu-check.csv and its records, results/ (the scripts' CSVs and summary.md), checkpoints/ (fp16, in
# parts under 16 MiB, with the per-epoch logs). A failed stage is recorded and the others still run; the exit
# status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=cuda DATASET=cifar10 TINY=0 EPOCHS="" STAGES=install,check,train,fuse
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:-}"; shift 2 ;;
    --dataset) DATASET="${2:-}"; shift 2 ;;
    --epochs) EPOCHS="${2:-}"; shift 2 ;;
    --stages) STAGES="${2:-}"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1; see bench/gpu/run.sh --help" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda | cpu) ;; *) echo "run.sh: --device $DEVICE: use cuda or cpu" >&2; exit 2 ;; esac
case "$DATASET" in cifar10 | cifar100) ;; *) echo "run.sh: --dataset $DATASET: use cifar10 or cifar100" >&2; exit 2 ;; esac
case "$EPOCHS" in "" | *[!0-9]* | 0) EPOCHS=$([ "$TINY" = 1 ] && echo 1 || echo 50) ;; esac

# every size in one place: the real run (the shared width-64 pair's recipe) and the dry run
if [ "$TINY" = 1 ]; then
  WIDTH=8 BATCH=32 LR=0.05 CHECK_ARGS=(--devices "$DEVICE" --epochs 1 --quick)
  FUSE_ARGS=(--bn-batches 4 --n-images 100 --refit-n-images 100 --repair-n-images 100)  # the tiny set has 500 training images
else
  WIDTH=64 BATCH=512 LR=0.4 CHECK_ARGS=(--devices "$([ "$DEVICE" = cuda ] && echo cuda,cpu || echo cpu)" --epochs 10)
  FUSE_ARGS=()  # the fusion scripts' defaults
fi
OUT="${OUT:-results/gpu-run}"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
GPU_DATA="${GPU_DATA:-.gpu-data}"  # the carried data: <dataset>-jpeg.tar.xz and SHA256SUMS (prepare.sh)
ARCHIVE="$GPU_DATA/$DATASET-jpeg.tar.xz"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/otfuse-gpu.XXXXXX")"
DATA_DIR="$WORK/data" CK="$WORK/checkpoints"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
echo "stage,seconds,status" > "$OUT/stages.csv"
STATUS=0
T_START=$SECONDS

# stage NAME COMMAND...: runs it unless --stages leaves it out, times it, records it; a failure is kept for the exit status
stage() {
  local name="$1" t0=$SECONDS rc
  shift
  case ",$STAGES," in *",$name,"*) ;; *) echo "== $name: skipped (--stages)"; return 0 ;; esac
  echo "== $name"
  "$@"
  rc=$?
  echo "$name,$((SECONDS - t0)),$rc" >> "$OUT/stages.csv"
  echo "== $name: $((SECONDS - t0)) s, exit status $rc (total $((SECONDS - T_START)) s)"
  [ "$rc" = 0 ] || [ "$STATUS" != 0 ] || STATUS=$rc
  return "$rc"
}

install() {
  "$PYTHON" bench/gpu/wheels.py install .whl "$WORK/site" || return 1
  export PYTHONPATH="$WORK/site:$PYTHONPATH"
  if [ -f "$GPU_DATA/SHA256SUMS" ]; then (cd "$GPU_DATA" && sha256sum --quiet -c SHA256SUMS) || { echo "run.sh: $ARCHIVE does not match its checksum: run bench/gpu/prepare.sh again"; return 1; }; fi
  [ -f "$ARCHIVE" ] || { echo "run.sh: $ARCHIVE is missing: run bench/gpu/prepare.sh --dataset $DATASET here and carry .gpu-data"; return 1; }
  "$PYTHON" - "$DEVICE" <<'PY'
import importlib.util, sys, torch
missing = [m for m in ("ot", "torch_pruning", "optuna", "sklearn", "otfuse.fusion") if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
    sys.exit(f"run.sh: cannot import {', '.join(missing)}: carry .whl (bench/gpu/prepare.sh makes it)")
import otfuse, ot
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, POT {ot.__version__}, otfuse {otfuse.__version__}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("run.sh: CUDA is not available here; use --device cpu")
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}")
PY
}

check() {
  "$PYTHON" bench/gpu_check.py "${CHECK_ARGS[@]}" --dataset digits --data-dir "$DATA_DIR" --out "$OUT/gpu-check.csv"
}

train_row() {
  local data="$ARCHIVE" seed paths=()
  if [ "$TINY" = 1 ]; then
    data="$WORK/tiny-$DATASET.tar.xz"
    "$PYTHON" bench/gpu/subset.py "$ARCHIVE" "$data" --per-class 50 || return 1
  fi
  echo "imagefolder:$data" > "$WORK/dataset"
  for seed in 0 1; do
    "$PYTHON" -m otfuse train --dataset "imagefolder:$data" --width "$WIDTH" --epochs "$EPOCHS" --batch-size "$BATCH" --lr "$LR" \
      --seed "$seed" --device "$DEVICE" --data-dir "$DATA_DIR" --checkpoint-dir "$CK" || return 1
  done
  mapfile -t paths < <(find "$CK" -name 'seed*.pt' | sort)
  "$PYTHON" bench/gpu/pack.py "$OUT/checkpoints" "${paths[@]}"
}

fuse_row() {
  local args=(--checkpoint-dir "$CK" --results-dir "$OUT/results" --data-dir "$DATA_DIR" --device "$DEVICE" --pairs 0-1 "${FUSE_ARGS[@]}")
  "$PYTHON" run_activation_based_fusion.py "${args[@]}" --finetune-epochs 1 || return 1
  "$PYTHON" run_weight_based_fusion.py "${args[@]}"
}

echo "run.sh: device $DEVICE, dataset $DATASET (JPEG copy), width $WIDTH, $EPOCHS epochs, stages $STAGES, output $OUT"
stage install install || { echo "run.sh: nothing else can run without the packages"; exit 1; }
stage check check
stage train train_row && stage fuse fuse_row
echo "run.sh: done in $((SECONDS - T_START)) s, exit status $STATUS; seconds per stage in $OUT/stages.csv"
rm -rf "$WORK"
exit "$STATUS"
