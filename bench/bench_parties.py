#!/usr/bin/env python
"""K parties that never pool their data: each trains on its part of a partition, then the K models are fused into one.

    python bench/bench_parties.py --settings cifar10-dir0.5-k4-shared         # one setting: trains its parties, fuses
    python bench/bench_parties.py                                             # every default setting (hours on 2 cores)
    nohup python bench/bench_parties.py > parties.log &                       # in the background, resumable

A setting is a dataset, a width, a partition (`otfuse train --partition dirichlet --alpha A`, as Flower Datasets'
DirichletPartitioner), K parties and their start: `shared` (every party from one initialisation, the federated norm)
or `own` (each from its own). Each party trains `epochs` epochs over its own part with `otfuse train`'s recipe (K
parties together cost about one model trained on all the data) into <checkpoint-dir>/<setting>/, and resumes.

Then one row per (setting, variant) goes to bench/parties-<dataset>-w<width>.csv as it finishes (a row already there
is skipped), on the split --split (validation to choose a default, test to report): every party's accuracy, the
best party, their ensemble (mean probabilities, equal weights whatever the variant weighs) and, where the parties'
classes differ, their per-class ensemble (`ensemble_counts`: the logits weighed per class by each party's share of
the class's training images, the target the default fusion distils towards), vanilla averaging with
BatchNorm recomputed (FedAvg in one round) and refit, the aligned average with BatchNorm recomputed, and the fusion,
with the fusion's share of the ensemble, the seconds and the options. A variant is a set of fusion options
(`--variants`: the names in VARIANTS). Rows measured before `ensemble_counts` existed get it on the next run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness import CIFAR10, CIFAR100, Table, common_options, trained

from otfuse.distill import target_probs
from otfuse.errors import OtfuseError, run_main
from otfuse.evaluate import accuracy_of_logits, ensemble_of_logits, logits
from otfuse.fusion import FuseConfig, head_weights
from otfuse.inputs import FusionInputs, fusion_inputs
from otfuse.options import flatten
from otfuse.precision import resolve_precision
from otfuse.report import fusion_table


@dataclass(frozen=True)
class Setting:
    dataset: str
    width: int
    parties: int
    alpha: float
    init: str  # shared | own
    epochs: int = 30  # over each party's own part
    partition: str = "dirichlet"


def _settings() -> dict[str, Setting]:
    out = {
        f"cifar10-dir{a:g}-k{k}-{init}": Setting(CIFAR10, 16, k, a, init)
        for k in (2, 4, 8)
        for a in (0.5, 0.1)
        for init in ("shared", "own")
    }
    out.update({f"cifar100-dir0.5-k{k}-shared": Setting(CIFAR100, 32, k, 0.5, "shared") for k in (2, 4)})
    out["digits-dir0.5-k3-shared"] = Setting("digits", 8, 3, 0.5, "shared", epochs=10)  # a quick guard, the test's
    return out


SETTINGS = _settings()
DEFAULT = tuple(n for n in SETTINGS if not n.startswith("digits"))
# (fusion options) per variant; the default fusion is "default" (the default of the day a row was measured: its options)
VARIANTS = {
    "default": {},
    "refit-only": {"head": "equal", "weights": "", "distill_epochs": 0},  # the default before the distillation pass
    "head-counts": {"head": "counts"},
    "head-probs": {"head_probs": True},
    "head-counts-probs": {"head": "counts", "head_probs": True},
    "rounds2": {"rounds": 2},
    "head-counts-4000": {"head": "counts", "refit_n_images": 4000},
    "head-counts-augment": {"head": "counts", "refit_augment": True},
    "head-counts-ridge0.001": {"head": "counts", "refit_ridge": 0.001},
    "sizes-head-counts": {"head": "counts", "weights": "sizes"},  # each party weighed by its training images, as FedAvg
    "distill1": {"distill_epochs": 1},  # then one pass over the fusion images distilling the parties' target
    "sizes-head-counts-distill1": {"head": "counts", "weights": "sizes", "distill_epochs": 1},
    "own-data": {"fusion_data": "model1"},  # a fuser holding only party 1's images
    "public-cifar100": {"fusion_data": f"public:{CIFAR100}"},  # one holding none: CIFAR-100's training images
}
KEY = ("setting", "variant", "split")
MEASURED = ("ensemble", "ensemble_counts", "vanilla_bn", "vanilla_refit", "fused_average", "fused")


def parties(name: str, s: Setting, checkpoint_dir: Path, data_dir: str | None, progress: bool) -> list[Path]:
    """Train (or resume, or find finished) the setting's K parties: party i is --party i of the partition, seed 0."""
    return [
        trained(
            f"{name}: party {i} of {s.parties}",
            progress,
            dataset=s.dataset,
            width=s.width,
            epochs=s.epochs,
            seed=0,
            partition=s.partition,
            parties=s.parties,
            party=i,
            alpha=s.alpha,
            init_seed=-1 if s.init == "shared" else 1000 + i,
            out=str(checkpoint_dir / name / f"party{i}.pt"),
            data_dir=data_dir,
        )
        for i in range(1, s.parties + 1)
    ]


def measure(name: str, s: Setting, paths: list[Path], variant: str, args: argparse.Namespace) -> dict | None:
    """One row: the setting's parties fused with the variant's options, every model measured on --split."""
    inputs = fusion_inputs(paths, dict(VARIANTS[variant]), data_dir=args.data_dir, device=args.device)
    table = Table(Path(args.out_dir) / f"parties-{inputs.data.slug.removeprefix('imagefolder-')}-w{s.width}.csv", KEY)
    if table.has(setting=name, variant=variant, split=args.split):
        fill_references(table, name, inputs, args.split)
        return None
    t0 = time.perf_counter()
    baselines = variant in ("default", "refit-only")  # vanilla averaging and its refit do not depend on the variant
    fusion, acc = fusion_table(
        inputs.models,
        inputs.data,
        inputs.cfg,
        args.split,
        progress=True,
        with_baselines=baselines,
        target=inputs.target,
        class_counts=inputs.class_counts,
    )
    ref = references(inputs, args.split)  # the yardsticks stay the same whatever a variant weighs
    acc.update({k: v for k, v in ref.items() if "ensemble" in k})
    party_acc = [acc[f"model{i + 1}"] for i in range(s.parties)]
    row = {
        "setting": name,
        "variant": variant,
        "split": args.split,
        "dataset": inputs.data.slug,
        "width": s.width,
        "parties": s.parties,
        "alpha": s.alpha,
        "init": s.init,
        "epochs": s.epochs,
        "best_party": f"{max(party_acc):.2f}",
        **{k: f"{acc[k]:.2f}" for k in MEASURED if k in acc},
        "fused_of_ensemble": f"{100 * acc['fused'] / acc['ensemble']:.1f}",
        "fused_minus_best": f"{acc['fused'] - max(party_acc):.2f}",
        **{f"party{i + 1}": f"{a:.2f}" for i, a in enumerate(party_acc)},
        "seconds_fusion": f"{sum(v for k, v in fusion.seconds.items() if k not in ('baselines', 'evaluation')):.0f}",
        "seconds": f"{time.perf_counter() - t0:.0f}",
        "options": json.dumps(flatten(inputs.cfg), sort_keys=True),
    }
    table.put(row)
    print(
        f"{name} {variant} ({args.split}): "
        + ", ".join(f"{k} {row.get(k, '-')}" for k in ("best_party", "ensemble", "vanilla_bn", "fused"))
    )
    return row


def references(inputs: FusionInputs, split: str) -> dict[str, float]:
    """The parties' accuracies on `split` (`party1`..) and their ensembles: `ensemble` (equal mean probabilities) and,
    where their class counts differ, `ensemble_counts` (the logits weighed per class by each party's share of the
    class: the default fusion's target)."""
    x, y = inputs.data.split(split)
    precision = resolve_precision(inputs.cfg.precision, x.device)
    zs = [logits(m, x, inputs.data.norm, precision=precision) for m in inputs.models]
    equal = [1 / len(zs)] * len(zs)
    out = {f"party{i + 1}": accuracy_of_logits(z, y) for i, z in enumerate(zs)}
    out["ensemble"] = accuracy_of_logits(ensemble_of_logits(zs, equal), y)
    if not bool((inputs.class_counts == inputs.class_counts[:1]).all()):
        head = head_weights(FuseConfig(head="counts"), inputs.class_counts, equal)
        out["ensemble_counts"] = accuracy_of_logits(target_probs(zs, head, 1.0, probs=False), y)
    return out


def fill_references(table: Table, name: str, inputs: FusionInputs, split: str) -> None:
    """`ensemble_counts` on the setting's rows of `split` measured before the column existed, where the parties on
    disk are the row's (each party's accuracy the same to the hundredth: parties trained again differ a little)."""
    rows = table.rows
    missing = [r for r in rows if r["setting"] == name and r["split"] == split and not r.get("ensemble_counts")]
    if not missing:
        return
    ref = {k: f"{v:.2f}" for k, v in references(inputs, split).items()}
    same = [r for r in missing if all(r.get(k) == v for k, v in ref.items() if k.startswith("party"))]
    if "ensemble_counts" not in ref or not same:
        return
    for r in same:
        r["ensemble_counts"] = ref["ensemble_counts"]
    table.rewrite(rows)
    print(f"{name} ({split}): ensemble_counts {ref['ensemble_counts']} on {len(same)} earlier rows of these parties")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default=",".join(DEFAULT), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--split", default="val", choices=("val", "test"), help="val: to choose the default; test: to report")
    p.add_argument("--checkpoint-dir", default="checkpoint/parties")
    common_options(p)
    args = p.parse_args(argv)

    def run() -> int:
        names = [n for n in args.settings.split(",") if n]
        variants = [v for v in args.variants.split(",") if v]
        for given, known, what in ((names, SETTINGS, "--settings"), (variants, VARIANTS, "--variants")):
            unknown = [n for n in given if n not in known]
            if unknown:
                raise OtfuseError(f"{what}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        for name in names:
            s = SETTINGS[name]
            paths = parties(name, s, Path(args.checkpoint_dir), args.data_dir, progress=True)
            for variant in variants:
                measure(name, s, paths, variant, args)
        return 0

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
