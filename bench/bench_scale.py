#!/usr/bin/env python
"""The whole fusion table at the scale users run: two long-trained checkpoints, every baseline, every method.

    python bench/bench_scale.py ../shared/checkpoints/cifar10-jpeg-w64-e50/seed0.pt ../shared/checkpoints/cifar10-jpeg-w64-e50/seed1.pt
    python bench/bench_scale.py A.pt B.pt --split val --methods activation      # choosing defaults: never the test set
    python bench/bench_scale.py A.pt B.pt --save fused.pt && otfuse finetune fused.pt --epochs 1

Row `default`: the default fusion (`otfuse fuse A B`) beside each parent, their ensemble,
vanilla averaging (+ BatchNorm reset, + refit), the aligned average with BatchNorm reset
("average only") and REPAIR on it; then one row per other alignment method (its fusion and its
average only). Every row has the fused model's agreement with each parent and seconds per phase.
Rows go to bench/scale-<dataset>[-<arch>]-w<width>[-<split>].csv (no arch for resnet18), one per
(row, precision), each as it finishes; a row already there is skipped, so a stopped run resumes
(`--base precision=fp32` for the float32 reference). Evaluation runs in the fusion's precision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import Table, common_options

from otfuse.align import METHODS
from otfuse.checkpoints import fused_meta, save_checkpoint
from otfuse.errors import run_main
from otfuse.evaluate import accuracy_of_logits, agreement, logits
from otfuse.fusion import FuseConfig, fuse
from otfuse.inputs import fusion_inputs
from otfuse.options import build, flatten, parse_assignments
from otfuse.precision import resolve_precision
from otfuse.report import fusion_table
from otfuse.results import bench_stem
from otfuse.storage import writable_file

PHASES = ("groups", "alignment", "averaging", "batchnorm", "repair", "refit", "baselines", "evaluation")
FIELDS = [
    "row",
    "method",
    "model1",
    "model2",
    "ensemble",
    "vanilla",
    "vanilla_bn",
    "vanilla_refit",
    "fused_no_bn",
    "fused_average",
    "fused_repair",
    "fused",
    "agree_model1",
    "agree_model2",
    *(f"s_{k}" for k in PHASES),
    "precision",
    "split",
    "dataset",
    "options",
]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs=2)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--methods", default=",".join(METHODS), help="methods with a row of their own (the first is the default row's)")
    p.add_argument("--base", default="", help="options for every row, e.g. refit_n_images=2000 (default: the defaults)")
    common_options(p)
    p.add_argument("--save", default="", help="also save the default fusion as a checkpoint (for otfuse finetune)")
    args = p.parse_args(argv)

    def run() -> int:
        base = parse_assignments(args.base, FuseConfig)
        methods = [m for m in args.methods.split(",") if m]
        t0 = time.perf_counter()
        inputs = fusion_inputs(args.checkpoints, base, data_dir=args.data_dir, device=args.device, same_width=True)
        models, metas, data = inputs.models, inputs.metas, inputs.data
        base = flatten(inputs.cfg)  # the defaults `otfuse fuse` takes for these parents, then --base
        precision = resolve_precision(inputs.cfg.precision, next(models[0].parameters()).device)
        meta = metas[0]
        suffix = "" if args.split == "test" else f"-{args.split}"
        # rows of earlier runs stay; a row already there for this precision is skipped (a stopped run resumes)
        table = Table(Path(args.out_dir) / f"scale-{bench_stem(meta, data)}{suffix}.csv", ("row", "precision"), FIELDS)
        done = lambda row: table.has(row=row, precision=precision)
        options = flatten(build(FuseConfig, base))
        x, y = data.split(args.split)

        def record(row: dict) -> None:
            table.put({**row, "precision": precision, "split": args.split, "dataset": data.slug, "options": options})
            print(_line(row), flush=True)

        if args.save:
            writable_file(Path(args.save), "--save")
        if not done("default") or args.save:
            cfg = build(FuseConfig, {**base, "method": methods[0]})
            fusion, acc = fusion_table(models, data, cfg, args.split, progress=True)
            if not done("default"):
                record(
                    {
                        "row": "default",
                        "method": methods[0],
                        **{k: f"{v:.2f}" for k, v in acc.items()},
                        **{f"s_{k}": f"{fusion.seconds.get(k, 0.0):.1f}" for k in PHASES},
                    }
                )
            if args.save:
                save_checkpoint(
                    args.save,
                    fusion.fused,
                    fused_meta(
                        metas,
                        args.checkpoints,
                        meta["width"],
                        flatten(cfg),
                        acc["fused"] if args.split == "test" else None,
                    ),
                )
        parent = None  # the parents' logits, for the other rows' agreement: computed once, when a row needs them
        for method in methods[1:]:
            if done(method):
                continue
            cfg = build(FuseConfig, {**base, "method": method})
            result = fuse(models, data.train_x, data.norm, cfg, progress=True)
            t1 = time.perf_counter()
            parent = parent or [logits(m, x, data.norm, precision=precision) for m in models]
            z = logits(result.fused, x, data.norm, precision=precision)
            row = {
                "row": method,
                "method": method,
                "fused": f"{accuracy_of_logits(z, y):.2f}",
                "fused_average": f"{accuracy_of_logits(logits(result.fused_average, x, data.norm, precision=precision), y):.2f}",
                **{f"agree_model{i + 1}": f"{agreement(z, q):.2f}" for i, q in enumerate(parent)},
            }
            result.seconds["evaluation"] = time.perf_counter() - t1
            row.update({f"s_{k}": f"{result.seconds.get(k, 0.0):.1f}" for k in PHASES})
            record(row)
        print(f"wrote {table.path} ({time.perf_counter() - t0:.0f} s in all)")
        return 0

    return run_main(run)


def _line(row: dict) -> str:
    keys = (
        "model1",
        "model2",
        "ensemble",
        "vanilla_bn",
        "vanilla_refit",
        "fused_average",
        "fused_repair",
        "fused",
        "agree_model1",
        "agree_model2",
    )
    return f"{row['row']:<16} " + " ".join(f"{k} {row[k]}" for k in keys if k in row)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
