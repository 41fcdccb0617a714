#!/usr/bin/env python
"""The whole fusion table at the scale users run: two long-trained checkpoints, every baseline, every method.

    python bench/bench_scale.py ../shared/checkpoints/cifar10-jpeg-w64-e50/seed0.pt ../shared/checkpoints/cifar10-jpeg-w64-e50/seed1.pt
    python bench/bench_scale.py A.pt B.pt --split val --methods activation      # choosing defaults: never the test set
    python bench/bench_scale.py A.pt B.pt --save fused.pt && otfuse finetune fused.pt --epochs 1

Row `default`: the default fusion (`otfuse fuse A B`) beside each parent, their ensemble,
vanilla averaging (+ BatchNorm reset, + refit), the aligned average with BatchNorm reset
("average only") and REPAIR on it; then one row per other alignment method (its fusion and its
average only). Every row has the fused model's agreement with each parent and seconds per phase.
Rows go to bench/scale-<dataset>-w<width>[-<split>].csv. About 35 minutes on 2 CPU cores for two
width-64 ResNet18s, evaluation included.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from otfuse.align import METHODS
from otfuse.checkpoints import fused_meta, load_parents, recipe_options, save_checkpoint
from otfuse.data import dataset_slug
from otfuse.errors import run_main
from otfuse.evaluate import accuracy_of_logits, agreement, logits
from otfuse.fuse import FuseConfig, fuse
from otfuse.options import build, flatten, parse_assignments
from otfuse.report import fusion_table
from otfuse.storage import atomic_write_csv, writable_file

PHASES = ("groups", "alignment", "averaging", "batchnorm", "repair", "refit", "baselines", "evaluation")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs=2)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--methods", default=",".join(METHODS), help="methods with a row of their own (the first is the default row's)")
    p.add_argument("--base", default="", help="options for every row, e.g. refit_n_images=2000 (default: the defaults)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", default=str(Path(__file__).parent))
    p.add_argument("--save", default="", help="also save the default fusion as a checkpoint (for otfuse finetune)")
    args = p.parse_args(argv)

    def run() -> int:
        base = parse_assignments(args.base, FuseConfig)
        methods = [m for m in args.methods.split(",") if m]
        t0 = time.perf_counter()
        models, metas, data = load_parents(args.checkpoints, args.data_dir, args.device)
        base = {**recipe_options(metas), **base}  # the defaults `otfuse fuse` takes for these parents
        x, y = data.split(args.split)
        rows = []
        if args.save:
            writable_file(Path(args.save), "--save")
        cfg = build(FuseConfig, {**base, "method": methods[0]})
        fusion, acc = fusion_table(models, data, cfg, args.split, progress=True)
        rows.append({"row": "default", "method": methods[0], **{k: f"{v:.2f}" for k, v in acc.items()},
                     **{f"s_{k}": f"{fusion.seconds.get(k, 0.0):.1f}" for k in PHASES}})
        print(_line(rows[-1]), flush=True)
        if args.save:
            save_checkpoint(args.save, fusion.model, fused_meta(metas, args.checkpoints, metas[0]["width"], flatten(cfg),
                                                                len(data.val_y), acc["fused"] if args.split == "test" else None))
        parent = [logits(m, x, data.norm) for m in models] if methods[1:] else []  # for the other rows' agreement
        for method in methods[1:]:
            cfg = build(FuseConfig, {**base, "method": method})
            result = fuse(models, data.train_x, data.norm, cfg, progress=True)
            t1 = time.perf_counter()
            z = logits(result.model, x, data.norm)
            row = {"row": method, "method": method, "fused": f"{accuracy_of_logits(z, y):.2f}",
                   "fused_average": f"{accuracy_of_logits(logits(result.average, x, data.norm), y):.2f}",
                   **{f"agree_model{i + 1}": f"{agreement(z, q):.2f}" for i, q in enumerate(parent)}}
            result.seconds["evaluation"] = time.perf_counter() - t1
            row.update({f"s_{k}": f"{result.seconds.get(k, 0.0):.1f}" for k in PHASES})
            rows.append(row)
            print(_line(row), flush=True)
        meta = metas[0]
        suffix = "" if args.split == "test" else f"-{args.split}"
        out = Path(args.out_dir) / f"scale-{dataset_slug(meta['dataset']).removeprefix('imagefolder-')}-w{meta['width']}{suffix}.csv"
        options = flatten(build(FuseConfig, base))
        fields = ["row", "method", "model1", "model2", "ensemble", "vanilla", "vanilla_bn", "vanilla_refit", "fused_no_bn",
                  "fused_average", "fused_repair", "fused", "agree_model1", "agree_model2", *(f"s_{k}" for k in PHASES)]
        atomic_write_csv(out, [{**r, "split": args.split, "dataset": meta["dataset"], "options": options} for r in rows],
                         fields + ["split", "dataset", "options"])
        print(f"wrote {out} ({time.perf_counter() - t0:.0f} s in all)")
        return 0

    return run_main(run)


def _line(row: dict) -> str:
    keys = ("model1", "model2", "ensemble", "vanilla_bn", "vanilla_refit", "fused_average", "fused_repair", "fused",
            "agree_model1", "agree_model2")
    return f"{row['row']:<16} " + " ".join(f"{k} {row[k]}" for k in keys if k in row)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
