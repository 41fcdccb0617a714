#!/usr/bin/env python
"""Measure the fusion knobs on the validation split (never the test set), one change at a time.

    python bench/bench_knobs.py A.pt B.pt [--data-dir DIR] [--device cpu] [--only point=both,repair=True]
    python bench/bench_knobs.py A.pt B.pt --base refit=False --name average   # the knobs of the plain average

Each row fuses A and B with the defaults (and `--base`) plus one change and reports the fused
model's validation accuracy, how often it agrees with each parent's predictions, and the seconds
it took; the rows go to bench/knobs-<dataset>[-<arch>]-w<width>[-<name>].csv, each as it finishes (a
stopped run resumes: a change already there with the same defaults is skipped). A fusion that leans on A
(agrees with A far more than with B) has blended B away rather than merged it.
The defaults of `FuseConfig` were chosen from these tables (docs/defaults.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness import Table, common_options

from otfuse.errors import run_main
from otfuse.fusion import FuseConfig
from otfuse.inputs import fusion_inputs
from otfuse.options import build, flatten, parse_assignments
from otfuse.results import bench_stem
from otfuse.tune import val_accuracy

# one change from the defaults per row
CHANGES = [
    {},
    {"cost": "euclidean"},
    {"point": "pre"},
    {"point": "post"},
    {"mix": 0.3},
    {"n_images": 250},
    {"n_images": 4000},
    {"refit_n_images": 2000},
    {"refit_n_images": 4000},
    {"n_images": 4000, "refit_n_images": 4000},  # 40 images a class at 100 classes, as 1,000 are at 10
    {"solver": "sinkhorn", "reg": 0.01},
    {"solver": "sinkhorn", "reg": 0.05},
    {"solver": "sinkhorn", "reg": 0.2},
    {"solver": "sinkhorn", "reg": 100.0},  # a uniform map: B's channels all blended, no alignment at all
    {"method": "weight", "solver": "sinkhorn", "reg": 0.003},
    {"bn_batches": 25},
    {"bn_batches": 400},
    {"bn_augment": True},
    {"repair": True},
    {"refit": False},
    {"refit_ridge": 0.001},
    {"refit_ridge": 0.1},
    {"refit_ridge": 1.0},
    {"method": "weight"},
    {"method": "weight-matching"},
]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs=2)
    common_options(p)
    p.add_argument("--only", action="append", default=[], help="measure only these changes (repeatable)")
    p.add_argument("--base", default="", help="changes applied to every row, e.g. refit=False")
    p.add_argument("--name", default="", help="suffix of the table's file name")
    args = p.parse_args(argv)

    def run() -> int:
        inputs = fusion_inputs(
            args.checkpoints, parse_assignments(args.base, FuseConfig), data_dir=args.data_dir, device=args.device, same_width=True
        )
        models, metas, data = inputs.models, inputs.metas, inputs.data
        changes = [parse_assignments(c, FuseConfig) for c in args.only] or CHANGES
        base = flatten(inputs.cfg)  # the defaults `otfuse fuse` takes for these parents, then --base
        meta = metas[0]
        seeds = "-".join(str(m.get("seed")) for m in metas)
        defaults = json.dumps(flatten(build(FuseConfig, base)), sort_keys=True)
        name = f"-{args.name}" if args.name else ""
        table = Table(Path(args.out_dir) / f"knobs-{bench_stem(meta, data)}{name}.csv", ("change", "seeds", "defaults"))
        for change in changes:
            label = ",".join(f"{k}={v}" for k, v in change.items()) or "defaults"
            if table.has(change=label, seeds=seeds, defaults=defaults):
                continue
            cfg = build(FuseConfig, {**base, **change})
            t0 = time.perf_counter()
            _, acc, agree = val_accuracy(models, data, cfg)
            r = {
                "dataset": data.slug,
                "width": meta["width"],
                "seeds": seeds,
                "change": label,
                "val_accuracy": f"{acc:.2f}",
                "agree_model1": f"{agree[0]:.2f}",
                "agree_model2": f"{agree[1]:.2f}",
                "seconds": f"{time.perf_counter() - t0:.1f}",
                "defaults": defaults,
            }
            table.put(r)
            print(
                f"{r['change']:<36} val {r['val_accuracy']:>6}%  agrees with A/B {r['agree_model1']}/{r['agree_model2']}%"
                f"  {r['seconds']:>6} s",
                flush=True,
            )
        print(f"wrote {table.path}")
        return 0

    return run_main(run)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
