#!/usr/bin/env python
"""Cost of fusing two width-64 ResNet18s against the forward passes the fusion needs.

Activation method, 1,000 images, BatchNorm recomputed on 100 batches of 128: the forward passes
are 2 x 1,000 images (both models) plus 12,800 (the fused model). Evaluation is excluded.
Target: fusion / forward passes <= 1.3. That is the aligned average; the layer-wise refit (on
by default, otfuse.refit) runs partial forward passes per layer and is timed apart with --refit.

    python bench/bench_fusion.py [--width 64] [--device cpu] [--refit]
"""

import argparse
import time

import torch

from otfuse.data import image_batches
from otfuse.fusion import FuseConfig, fuse
from otfuse.models import build_model
from otfuse.options import build


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--refit", action="store_true", help="also time the default pipeline, with the refit")
    args = p.parse_args()
    dev = torch.device(args.device)
    cfg = build(FuseConfig, {"method": "activation", "n_images": 1000, "bn_batches": 100, "bn_batch_size": 128, "refit": False})
    images = torch.randint(0, 256, (12_800, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(dev)
    norm = ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model("resnet18", args.width, 3, 10).to(dev).eval())

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # the forward passes alone: both parents on 1,000 images, the fused model on 100 x 128 in train mode
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for m in models:
            for xb in image_batches(images[: cfg.align.n_images], cfg.align.act_batch_size, norm):
                m(xb)
        probe = build_model("resnet18", args.width, 3, 10).to(dev).train()
        for xb in image_batches(images, cfg.bn.batch_size, norm, seed=0):
            probe(xb)
    sync()
    t_forward = time.perf_counter() - t0

    sync()
    t0 = time.perf_counter()
    timings = fuse(models, images, norm, cfg).seconds
    sync()
    t_fuse = time.perf_counter() - t0
    phases = ", ".join(f"{k} {v:.2f}" for k, v in timings.items())
    print(
        f"resnet18 w{args.width} on {dev}: forward passes {t_forward:.2f} s, fusion {t_fuse:.2f} s ({phases}); "
        f"ratio {t_fuse / t_forward:.2f} (target <= 1.3)"
    )
    if args.refit:
        cfg.refit.enabled = True
        timings = fuse(models, images, norm, cfg).seconds
        print(
            f"with the refit (the default): refit {timings['refit']:.2f} s more, "
            f"{sum(timings.values()) / t_forward:.2f} times the forward passes"
        )


if __name__ == "__main__":
    main()
