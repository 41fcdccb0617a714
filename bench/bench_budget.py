#!/usr/bin/env python
"""The accuracy/compute frontier of a pair of checkpoints: budgeted fusion (otfuse.budget: the least alike channels
per multiply-accumulate kept one per parent) from the full merge (1x one parent's) to every channel apart, beside
the depth cuts of `--merge-until` (otfuse.partial: merged up to a module, one branch per parent after it).

    python bench/bench_budget.py                          # the shared CIFAR-100 width-32 pair, the default points
    python bench/bench_budget.py A.pt B.pt --budgets 1,1.25,1.5,2 --cuts layer3.1,input

The parents are aligned by the default method and placed side by side (exactly their ensemble); each budget and
each cut is one row of bench/budget-<dataset>-w<width>.csv as it finishes (a row already there is skipped): the
channels kept apart (budgets), the model's multiply-accumulates against one parent's (Torch-Pruning's count for a
budget, torch's FLOP counter for a cut: the same ratio, as the model runs), its test accuracy, the ensemble's, the
parents' mean and seconds. Fusion reads 5,000 training images drawn with seed 0; every forward pass in float32. `python
tools/figures.py` draws the rows as docs/figures/frontier-<dataset>.png.
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
from otfuse.partial import chosen_cuts, partial_rows
from otfuse.precision import Precision
from otfuse.refit import RefitConfig
from otfuse.transplant import side_by_side

PAIR = "../shared/checkpoints/cifar100-png-w32-e15"
IMAGES = 5000  # training images the fusion reads (drawn with seed 0)
CUTS = "layer1.1,layer2.1,layer3.0,layer3.1,layer4.0,input"  # ResNet18's stage ends, the two blocks of stage 3, nothing merged


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="*", default=[f"{PAIR}/seed0.pt", f"{PAIR}/seed1.pt"])
    p.add_argument("--budgets", default="1,1.25,1.5,2,3,4", help="multiply-accumulates, in times one parent's (up to K * K)")
    p.add_argument("--cuts", default=CUTS, help="--merge-until's cuts to measure beside them (comma-separated, all, or none)")
    p.add_argument("--out", default="", help="the CSV (default: bench/budget-<dataset>-w<width>.csv)")
    args = p.parse_args(argv)
    parents = [load_checkpoint(c) for c in args.checkpoints]
    models, meta = [m.eval() for m, _, _ in parents], parents[0][1]
    data = load_dataset(meta["dataset"])
    table = Table(Path(args.out or HERE / f"budget-{data.slug}-w{meta['width']}.csv"), ("kind", "point"))
    budgets = [f"{float(b):g}" for b in args.budgets.split(",") if b]
    cuts = [] if args.cuts == "none" else chosen_cuts(models[0], args.cuts)
    todo = [("budget", b) for b in budgets if not table.has(kind="budget", point=b)]
    todo += [("cut", c) for c in cuts if not table.has(kind="cut", point=c)]
    if not todo:
        print(f"every point is in {table.path}")
        return 0
    pick = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))[:IMAGES]
    images, norm = data.train_x[pick], data.norm
    aligned = fuse(models, images, norm, FuseConfig(refit=RefitConfig(enabled=False), precision="fp32")).aligned
    wide = side_by_side(aligned, model_from_meta(meta, len(models) * meta["width"]), images, norm)
    x = example_input(images, norm, wide)
    ensemble = f"{accuracy(wide, data.test_x, data.test_y, norm, Precision.FP32):.2f}"
    mean = f"{sum(accuracy(m, data.test_x, data.test_y, norm, Precision.FP32) for m in models) / len(models):.2f}"
    merged = fuse(models, images, norm, FuseConfig(precision="fp32")) if any(k == "cut" for k, _ in todo) else None
    for kind, point in todo:
        t0 = time.time()
        if kind == "budget":
            unmerged = unmerged_for_budget(wide, len(models), float(point), images, norm)
            fused = budgeted(wide, len(models), unmerged, images, norm, FuseConfig(precision="fp32")).fused.eval()
            apart, ratio = sum(map(len, unmerged.values())), flops(fused, x) / flops(models[0], x)
            acc = accuracy(fused, data.test_x, data.test_y, norm, Precision.FP32)
        else:
            (r,) = partial_rows(merged, [point], images, data.test_x, data.test_y, norm)
            apart, ratio, acc = "", r["flops_x"], r["accuracy"]
        row = {
            "kind": kind,
            "point": point,
            "channels_apart": apart,
            "flops_x": f"{ratio:.3f}",
            "test_acc": f"{acc:.2f}",
            "ensemble": ensemble,
            "parents_mean": mean,
            "seconds": f"{time.time() - t0:.0f}",
        }
        table.put(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(lambda: main(sys.argv[1:])))
