#!/usr/bin/env bash
# On one GPU: train a width-64 ResNet18 on the CIFAR-10 JPEG copy (bf16 autocast, channels_last) and
# print seconds per epoch, peak GPU memory and final test accuracy. Installs nothing from the network:
# wheels it lacks travel in .whl/ beside the repo (see the device tool's notes).
#   EPOCHS=30 DATA=../shared/data/cifar10-jpeg.tar.xz bench/gpu_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
EPOCHS="${EPOCHS:-30}"
python3 - "$DATA" "$EPOCHS" <<'PY'
import sys, time, torch
from otfuse.train import TrainConfig, train
data, epochs = sys.argv[1], int(sys.argv[2])
cfg = TrainConfig(dataset=f"imagefolder:{data}", width=64, epochs=epochs, batch_size=512, lr=0.4, seed=0,
                  data_dir="/tmp/otfuse-data", checkpoint_dir="/tmp/otfuse-ck", device="cuda")
from otfuse.data import load_dataset
load_dataset(cfg.dataset, cfg.data_dir)  # decode once, outside the timing
torch.cuda.reset_peak_memory_stats()
t0 = time.time()
path = train(cfg, progress=False)
total = time.time() - t0
meta = torch.load(path, weights_only=True)["meta"]
per_epoch = [round(r["seconds"], 2) for r in meta["history"]]
print(f"gpu_train: {torch.cuda.get_device_name()}, width 64, {epochs} epochs, {total:.1f} s in all, "
      f"seconds per epoch {per_epoch}, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
      f"test accuracy {meta['test_acc']:.2f}% (CIFAR-10 JPEG copy)")
PY
