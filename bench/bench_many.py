#!/usr/bin/env python
"""More than two parents: the first k of the given checkpoints fused into one model, for k = 2 .. all, beside the
ensemble of the same k models.

    python bench/bench_many.py seed0.pt seed1.pt seed2.pt seed3.pt          # k = 2, 3, 4
    python bench/bench_many.py A.pt B.pt C.pt --split val

One row per k goes to bench/many-<dataset>[-<arch>]-w<width>.csv as it finishes (a row already there is skipped):
each parent's accuracy, their mean and best, the ensemble (mean softmax), vanilla averaging + refit, the aligned
average with BatchNorm recomputed and the default fusion (every model aligned onto the first), with seconds per
phase. The plot, results/many-<dataset>[-<arch>]-w<width>.png, shows accuracy against the number of models fused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import Table, common_options

from otfuse.errors import OtfuseError, run_main
from otfuse.inputs import fusion_inputs
from otfuse.options import flatten
from otfuse.plots import many_figure, save_figure
from otfuse.report import fusion_table
from otfuse.results import bench_stem

FIELDS = [
    "k",
    "seeds",
    "parents",
    "parent_mean",
    "parent_best",
    "ensemble",
    "vanilla_refit",
    "fused_average",
    "fused",
    "fused_minus_mean",
    "fused_minus_ensemble",
    "s_fusion",
    "s_evaluation",
    "split",
    "dataset",
    "options",
]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--split", default="test", choices=["val", "test"])
    common_options(p)
    p.add_argument("--results-dir", default="results")
    args = p.parse_args(argv)

    def run() -> int:
        if len(args.checkpoints) < 3:
            raise OtfuseError(f"give three or more checkpoints (k = 2 .. {len(args.checkpoints)}); for two, use bench_scale.py")
        inputs = fusion_inputs(args.checkpoints, data_dir=args.data_dir, device=args.device, same_width=True)
        suffix = "" if args.split == "test" else f"-{args.split}"
        stem = f"many-{bench_stem(inputs.metas[0], inputs.data)}{suffix}"
        table = Table(Path(args.out_dir) / f"{stem}.csv", ("seeds", "split"), FIELDS)
        for k in range(2, len(args.checkpoints) + 1):
            seeds = "-".join(str(m.get("seed")) for m in inputs.metas[:k])
            if table.has(seeds=seeds, split=args.split):
                continue
            t0 = time.perf_counter()
            fusion, acc = fusion_table(inputs.models[:k], inputs.data, inputs.cfg, args.split, progress=True)
            parents = [acc[f"model{i + 1}"] for i in range(k)]
            mean = sum(parents) / k
            row = {
                "k": k,
                "seeds": seeds,
                "parents": " / ".join(f"{a:.2f}" for a in parents),
                "parent_mean": f"{mean:.2f}",
                "parent_best": f"{max(parents):.2f}",
                **{c: f"{acc[c]:.2f}" for c in ("ensemble", "vanilla_refit", "fused_average", "fused")},
                "fused_minus_mean": f"{acc['fused'] - mean:.2f}",
                "fused_minus_ensemble": f"{acc['fused'] - acc['ensemble']:.2f}",
                "s_fusion": f"{sum(v for ph, v in fusion.seconds.items() if ph != 'evaluation'):.0f}",
                "s_evaluation": f"{fusion.seconds.get('evaluation', 0.0):.0f}",
                "split": args.split,
                "dataset": inputs.data.slug,
                "options": flatten(inputs.cfg),
            }
            table.put(row)
            print(f"k={k} ({time.perf_counter() - t0:.0f} s): " + ", ".join(f"{c} {row[c]}" for c in FIELDS[3:11]), flush=True)
        title = f"{inputs.data.slug}, {inputs.metas[0]['arch']} w{inputs.metas[0]['width']}: k models fused into one ({args.split})"
        save_figure(many_figure([r for r in table.rows if r["split"] == args.split], title), Path(args.results_dir) / f"{stem}.png")
        print(f"wrote {table.path}")
        return 0

    return run_main(run)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
