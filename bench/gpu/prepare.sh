#!/usr/bin/env bash
# Run here, without a GPU, before calling the GPU machine: everything bench/gpu/run.sh needs there, where no
# package index and no ../shared are reachable, placed in two folders git ignores (.git/info/exclude).
#   bench/gpu/prepare.sh                      # .whl/ (wheels the image lacks) + .gpu-data/cifar10-jpeg.tar.xz
#   bench/gpu/prepare.sh --dataset cifar100   # + a CIFAR-100 JPEG copy made here (the lossless archive is 131 MB)
# then, with the device tool:  command "bench/gpu/run.sh [--dataset cifar100]", carry [".whl", ".gpu-data"].
# Prints the size of everything that will travel and refuses (exit 2) above 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATASET=cifar10
SHARED="${SHARED:-../shared}"  # the shared folder beside the checkout: data/cifar10-jpeg.tar.xz, data/cifar100-png.tar.xz
LIMIT_MIB=60                     # the device tool carries at most 64 MiB; some room for what the run writes beside
while [ $# -gt 0 ]; do
  case "$1" in
    --dataset) DATASET="${2:-}"; shift 2 ;;
    -h | --help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown option $1; use --dataset cifar10|cifar100" >&2; exit 2 ;;
  esac
done
case "$DATASET" in
  cifar10 | cifar100) ;;
  *) echo "prepare.sh: --dataset $DATASET: use cifar10 or cifar100" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
die() { echo "prepare.sh: $*" >&2; exit 2; }
"$PYTHON" -c "import packaging, pip" 2>/dev/null || die "$PYTHON lacks pip or packaging: run ./run_tests.sh once (it makes .venv), or set PYTHON"

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for path in /.whl/ /.gpu-data/; do
  grep -qxF "$path" "$exclude" 2>/dev/null || echo "$path" >> "$exclude"
done

# wheels: downloaded again only when wheels.txt changed
stamp="$(sha256sum bench/gpu/wheels.txt bench/gpu/image.txt | sha256sum | cut -c1-16)"
if [ "$(cat .whl/.stamp 2>/dev/null)" != "$stamp" ]; then
  rm -rf .whl.part && mkdir .whl.part
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -r bench/gpu/wheels.txt -d .whl.part 2> >(grep -v "^WARNING: Location" >&2) || die "pip download failed (above); the package registry must be reachable"
  "$PYTHON" bench/gpu/wheels.py check .whl.part bench/gpu/wheels.txt bench/gpu/image.txt || die "the wheels above are incomplete"
  echo "$stamp" > .whl.part/.stamp
  rm -rf .whl && mv .whl.part .whl
fi

# data: only the archive this run reads, with its checksum (run.sh verifies it after the transfer)
mkdir -p .gpu-data
rm -f .gpu-data/*.tar.xz.part
archive=".gpu-data/$DATASET-jpeg.tar.xz"
if [ "$DATASET" = cifar10 ]; then
  src="$SHARED/data/cifar10-jpeg.tar.xz"
  [ -f "$src" ] || die "$src is missing; set SHARED to the folder holding data/cifar10-jpeg.tar.xz"
  cmp -s "$src" "$archive" 2>/dev/null || { cp "$src" "$archive.part" && mv "$archive.part" "$archive"; }
else
  src="$SHARED/data/cifar100-png.tar.xz"
  [ -f "$src" ] || die "$src is missing; set SHARED to the folder holding data/cifar100-png.tar.xz"
  "$PYTHON" -c "import torch, PIL, sklearn" 2>/dev/null || die "making the CIFAR-100 copy needs otfuse's packages: run ./run_tests.sh once (it makes .venv), or set PYTHON"
  made=".gpu-data/.cifar100-source"
  want="$(stat -c '%s %Y' "$src")"
  if [ ! -f "$archive" ] || [ "$(cat "$made" 2>/dev/null)" != "$want" ]; then
    rm -f "$archive"
    PYTHONPATH="$PWD/src" "$PYTHON" tools/jpeg_copy.py "imagefolder:$src" "$archive" || die "the CIFAR-100 JPEG copy failed (above)"
    echo "$want" > "$made"
  fi
fi
find .gpu-data -maxdepth 1 -name '*.tar.xz' ! -path "$archive" -delete  # the other dataset's archive stays here
(cd .gpu-data && sha256sum "$(basename "$archive")" > SHA256SUMS)

# what travels: tracked and untracked files git does not ignore, and the two carried folders
tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried=$(du -sb .whl .gpu-data | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
total=$((tree + carried))
echo "prepare.sh: to travel: working tree $(mib "$tree") MiB + .whl $(mib "$(du -sb .whl | cut -f1)") MiB + .gpu-data $(mib "$(du -sb .gpu-data | cut -f1)") MiB = $(mib "$total") MiB (limit $LIMIT_MIB)"
[ "$total" -le $((LIMIT_MIB * 1048576)) ] || die "$(mib "$total") MiB would travel, over $LIMIT_MIB MiB: remove large untracked files from the working tree"
extra=""
[ "$DATASET" = cifar100 ] && extra=" --dataset cifar100"
echo "prepare.sh: ready. Device tool: command \"bench/gpu/run.sh$extra\", carry [\".whl\", \".gpu-data\"], timeout_s 600"
