#!/usr/bin/env python
"""Budgeted fusion on a pair of checkpoints: accuracy against multiply-accumulates, from the full merge (1x one
parent's) up, the least alike channels per multiply-accumulate kept one per parent (otfuse.budget).

    python bench/bench_budget.py                                   # the shared CIFAR-100 width-32 pair, budgets 1, 1.25, 1.5
    python bench/bench_budget.py A.pt B.pt --budgets 1,1.25,1.5,2

The parents are aligned by the default method and placed side by side (exactly their ensemble); each budget is one
row of bench/budget-<dataset>-w<width>.csv as it finishes (a row already there is skipped): the channels kept apart,
the fused model's multiply-accumulates against one parent's (Torch-Pruning's count), its test accuracy, the ensemble's
and seconds. Fusion reads 5,000 training images drawn with seed 0; every forward pass in float32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from harness import HERE, Table

from otfuse.budget import budgeted, unmerged_for_budget
from otfuse.checkpoints import load_checkpoint
from otfuse.data import load_dataset
from otfuse.errors import run_main
from otfuse.evaluate import accuracy
from otfuse.fusion import FuseConfig, fuse
from otfuse.grouping.adapter import flops
from otfuse.grouping.group import example_input
from otfuse.models import model_from_meta
from otfuse.precision import Precision
from otfuse.refit import RefitConfig
from otfuse.transplant import side_by_side

PAIR = "../shared/checkpoints/cifar100-png-w32-e15"
IMAGES = 5000  # training images the fusion reads (drawn with seed 0)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="*", default=[f"{PAIR}/seed0.pt", f"{PAIR}/seed1.pt"])
    p.add_argument("--budgets", default="1,1.25,1.5", help="multiply-accumulates, in times one parent's")
    p.add_argument("--out", default="", help="the CSV (default: bench/budget-<dataset>-w<width>.csv)")
    args = p.parse_args(argv)
    parents = [load_checkpoint(c) for c in args.checkpoints]
    models, meta = [m.eval() for m, _, _ in parents], parents[0][1]
    data = load_dataset(meta["dataset"])
    table = Table(Path(args.out or HERE / f"budget-{data.slug}-w{meta['width']}.csv"), ("budget",))
    budgets = [float(b) for b in args.budgets.split(",")]
    if all(table.has(budget=f"{b:g}") for b in budgets):
        print(f"every budget is in {table.path}")
        return 0
    pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))[:IMAGES]
    images, norm = data.train_x[pick], data.norm
    aligned = fuse(models, images, norm, FuseConfig(refit=RefitConfig(enabled=False), precision="fp32")).aligned
    wide = side_by_side(aligned, model_from_meta(meta, len(models) * meta["width"]), images, norm)
    x = example_input(images, norm, wide)
    ensemble = accuracy(wide, data.test_x, data.test_y, norm, Precision.FP32)
    for b in budgets:
        if table.has(budget=f"{b:g}"):
            continue
        t0 = time.time()
        unmerged = unmerged_for_budget(wide, len(models), b, images, norm)
        fused = budgeted(wide, len(models), unmerged, images, norm, FuseConfig(precision="fp32")).fused.eval()
        row = {
            "budget": f"{b:g}",
            "channels_apart": sum(map(len, unmerged.values())),
            "flops_x": f"{flops(fused, x) / flops(models[0], x):.3f}",
            "test_acc": f"{accuracy(fused, data.test_x, data.test_y, norm, Precision.FP32):.2f}",
            "ensemble": f"{ensemble:.2f}",
            "seconds": f"{time.time() - t0:.0f}",
        }
        table.put(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main(sys.argv[1:])))
