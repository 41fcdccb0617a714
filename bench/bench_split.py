#!/usr/bin/env python
"""Merging models trained on different data: two parties, each on part of the dataset, fused into one model.

    python bench/bench_split.py                                   # every setting: trains the parties, then fuses them
    python bench/bench_split.py --settings cifar100-50+50         # one setting
    nohup python bench/bench_split.py > split.log &               # hours on 2 cores: in the background, resumable

A setting is a dataset, a width, an epoch count and a split: `disjoint` (party A trains on the first half of the
classes, party B on the second) or `biased` (A draws 80% of the first half's images and 20% of the rest's, B the
others: `otfuse train --classes ... --bias 0.8`). Party A is seed 0 and party B seed 1 (independent models). Each
party trains with `otfuse train`'s recipe into <checkpoint-dir>/<setting>/ and resumes where it stopped.

Then one row per (setting, method, fusion data, distillation passes) goes to bench/split-<dataset>-w<width>.csv as it finishes (a row
already there is skipped): the joint accuracy (every class of the test split) and the per-task accuracy (each
party's classes' test images, argmax within them; `_task1`, `_task2`) of each parent, their ensemble, vanilla
averaging (+ BatchNorm, + refit), the aligned average with BatchNorm recomputed ("permute"), REPAIR and the fusion.
The fusion data is `union` (the images both parties trained on) or `model1` (party A's own images only: a fuser
that holds only its own data). With --partial, the setting's partial merges over --cuts (stage ends by default) of the default
fusion go to results/partial-<dataset>.csv and .png.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import CIFAR10, CIFAR100, Table, common_options, trained

from otfuse.data import load_dataset
from otfuse.distill import passes
from otfuse.errors import OtfuseError, run_main
from otfuse.inputs import fusion_inputs
from otfuse.options import flatten
from otfuse.partial import chosen_cuts, partial_rows
from otfuse.report import fusion_table
from otfuse.results import read_rows
from otfuse.sweep import write_partial


@dataclass(frozen=True)
class Setting:
    dataset: str
    width: int
    epochs: int
    split: str  # disjoint | biased
    bias: float = 0.8  # the biased split's share


SETTINGS = {
    "cifar10-5+5": Setting(CIFAR10, 16, 30, "disjoint"),
    "cifar10-biased": Setting(CIFAR10, 16, 30, "biased"),
    "cifar100-50+50": Setting(CIFAR100, 32, 30, "disjoint"),  # the headline
    "cifar100-biased": Setting(CIFAR100, 16, 30, "biased"),
    "digits-5+5": Setting("digits", 8, 10, "disjoint"),  # a quick guard (and the test's), not in the default list
}
CUTS = "input,bn1,layer1.1,layer2.1,layer3.0,layer3.1,layer4.0,layer4.1,fc"  # ResNet18's stage ends, and block by block late
KEY = ("setting", "method", "fusion_data", "distill_epochs")
DEFAULT = ("cifar10-5+5", "cifar10-biased", "cifar100-50+50", "cifar100-biased")
RUNS = [("activation", "union"), ("activation", "model1"), ("weight", "union")]  # (method, fusion data) per setting
COLUMNS = ("model1", "model2", "ensemble", "vanilla", "vanilla_bn", "vanilla_refit", "fused_average", "fused_repair", "fused")
FIELDS = [
    "setting",
    "split",
    "method",
    "fusion_data",
    "distill_epochs",
    "width",
    "epochs",
    *[f"{c}{t}" for c in COLUMNS for t in ("", "_task1", "_task2")],
    "agree_model1",
    "agree_model2",
    "fused_of_ensemble",
    "seconds",
    "dataset",
    "options",
]


def parties(name: str, s: Setting, checkpoint_dir: Path, data_dir: str | None, progress: bool) -> list[Path]:
    """Train (or resume, or find finished) party A (seed 0, the first half of the classes) and party B (seed 1)."""
    n = load_dataset(s.dataset, data_dir).num_classes
    halves = [f"0-{n // 2 - 1}", f"{n // 2}-{n - 1}"]
    return [
        trained(
            f"{name}: party {'AB'[seed]} ({classes})",
            progress,
            dataset=s.dataset,
            width=s.width,
            epochs=s.epochs,
            seed=seed,
            classes=classes,
            bias=1.0 if s.split == "disjoint" else s.bias,
            out=str(checkpoint_dir / name / f"seed{seed}-c{classes}.pt"),
            data_dir=data_dir,
        )
        for seed, classes in enumerate(halves)
    ]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default=",".join(DEFAULT), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--partial", default="cifar100-50+50", help="settings whose partial merges are measured over --cuts")
    p.add_argument("--cuts", default=CUTS, help="the partial merges' cuts: modules, comma-separated, or all (every cut of the model)")
    p.add_argument("--runs", default="all", help="all, or one method:fusion-data of RUNS (e.g. activation:union)")
    p.add_argument("--checkpoint-dir", default="checkpoint/split")
    p.add_argument("--results-dir", default="results")
    common_options(p)
    args = p.parse_args(argv)

    def run() -> int:
        names = [n for n in args.settings.split(",") if n]
        unknown = [n for n in names if n not in SETTINGS]
        if unknown:
            raise OtfuseError(f"--settings: unknown {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
        for name in names:
            s = SETTINGS[name]
            paths = parties(name, s, Path(args.checkpoint_dir), args.data_dir, progress=True)
            for method, fusion_data in RUNS:
                if args.runs in ("all", f"{method}:{fusion_data}"):
                    measure(name, s, paths, method, fusion_data, args)
            if name in args.partial.split(","):
                partial(name, paths, args)
        return 0

    return run_main(run)


def measure(name: str, s: Setting, paths: list[Path], method: str, fusion_data: str, args: argparse.Namespace) -> None:
    """One row of bench/split-<dataset>-w<width>.csv: the fusion of the setting's parties with `method` on `fusion_data`."""
    inputs = fusion_inputs(paths, {"method": method, "fusion_data": fusion_data}, data_dir=args.data_dir, device=args.device)
    table = Table(Path(args.out_dir) / f"split-{inputs.data.slug.removeprefix('imagefolder-')}-w{s.width}.csv", KEY, FIELDS)
    epochs = f"{passes(inputs.cfg.distill, inputs.class_counts):g}"  # rows from before the distillation stage read 0
    if table.has(setting=name, method=method, fusion_data=fusion_data, distill_epochs=epochs):
        return
    t0 = time.perf_counter()
    _, acc = fusion_table(
        inputs.models, inputs.data, inputs.cfg, progress=True, target=inputs.target, tasks=inputs.tasks, class_counts=inputs.class_counts
    )
    row = {
        "setting": name,
        "split": s.split,
        "method": method,
        "fusion_data": fusion_data,
        "distill_epochs": epochs,
        "width": s.width,
        "epochs": s.epochs,
        **{k: f"{v:.2f}" for k, v in acc.items() if k in FIELDS},
        "fused_of_ensemble": f"{100 * acc['fused'] / acc['ensemble']:.1f}",
        "seconds": f"{time.perf_counter() - t0:.0f}",
        "dataset": inputs.data.slug,
        "options": flatten(inputs.cfg),
    }
    table.put(row)
    print(
        f"{name} {method} on {fusion_data}: "
        + ", ".join(f"{k} {row[k]}" for k in ("model1", "model2", "ensemble", "vanilla_refit", "fused_average", "fused_repair", "fused")),
        flush=True,
    )


def partial(name: str, paths: list[Path], args: argparse.Namespace) -> None:
    """The setting's default fusion merged up to each of --cuts: results/partial-<dataset>.csv and .png (nothing done
    where the CSV holds every cut of this fusion already)."""
    inputs = fusion_inputs(paths, {}, data_dir=args.data_dir, device=args.device)
    cuts = chosen_cuts(inputs.models[0], args.cuts)
    metas = inputs.metas
    key = {
        "dataset": inputs.data.slug,
        "arch": metas[0]["arch"],
        "width": metas[0]["width"],
        "widths": f"{metas[0]['width']}-{metas[1]['width']}",
        "seeds": f"{metas[0]['seed']}-{metas[1]['seed']}",
        "method": inputs.cfg.align.method,
        "parts": name,
        "fusion_data": inputs.cfg.fusion_data,
    }
    csv_path = Path(args.results_dir) / f"partial-{inputs.data.slug}.csv"
    done = {r["cut"] for r in read_rows(csv_path) if all(r.get(k) == str(v) for k, v in key.items())}
    if set(cuts) <= done:
        print(f"{name}: the partial merges at {len(cuts)} cuts are in {csv_path} already", flush=True)
        return
    fusion, acc = fusion_table(
        inputs.models, inputs.data, inputs.cfg, progress=True, target=inputs.target, tasks=inputs.tasks, with_baselines=False
    )
    rows = partial_rows(fusion, cuts, inputs.data.train_x, *inputs.data.split("test"), inputs.data.norm, inputs.tasks, progress=True)
    write_partial(
        Path(args.results_dir),
        inputs.data.slug,
        key,
        acc,
        rows,
        f"{name}: ResNet18 w{metas[0]['width']}, parties merged up to each cut, one branch per party after it",
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
