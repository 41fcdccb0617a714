#!/usr/bin/env python
"""The figures README.md and docs/ show, drawn from the committed CSVs they plot (as tools/tables.py renders tables).

    python tools/figures.py          # (re)draw every figure into docs/figures/

A figure is a function registered in FIGURES: it reads its CSVs and returns a matplotlib figure, saved as
docs/figures/<name>.png. A figure's numbers change in its CSV (a bench or a command writes it), never by hand.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path

from otfuse.plots import frontier_figure, methods_figure, parties_figure, save_figure

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures"
FIGURES: dict[str, Callable[[], object]] = {}


def figure(fn: Callable[[], object]) -> Callable[[], object]:
    FIGURES[fn.__name__.replace("_", "-")] = fn
    return fn


def rows(path: Path, **where: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        found = [r for r in csv.DictReader(f) if all(r.get(k) == v for k, v in where.items())]
    if not found:
        raise SystemExit(f"tools/figures.py: {path.relative_to(ROOT)} has no row with {where}")
    return found


SCALE_BARS = {  # bench_scale.py's column -> the bar's label, weakest method first
    "vanilla_bn": "vanilla average + BatchNorm reset",
    "fused_average": "OT-aligned average + BatchNorm reset\n(the original repository's method)",
    "fused_repair": "OT-aligned average + REPAIR",
    "vanilla_refit": "vanilla average + refit",
    "fused": "otfuse fuse (default)",
}


@figure
def fusion_methods() -> object:
    """The default fusion against the baselines on the two real-scale pairs, with the parents' mean and the ensemble."""
    panels = []
    for name, csv_name, precision in (  # the rows README's headline table shows
        ("CIFAR-10 (JPEG copy), ResNet18 width 64", "scale-cifar10-jpeg-w64.csv", "fp32"),
        ("CIFAR-100, ResNet18 width 32", "scale-cifar100-w32.csv", "bf16"),
    ):
        r = rows(ROOT / "bench" / csv_name, row="default", precision=precision, split="test")[0]
        bars = {label: float(r[column]) for column, label in SCALE_BARS.items()}
        mean = (float(r["model1"]) + float(r["model2"])) / 2
        panels.append((name, bars, {"parents' mean": mean, "ensemble of the two": float(r["ensemble"])}))
    return methods_figure(panels, "Two independently trained ResNet18s fused into one: test accuracy (bench/bench_scale.py)")


PARTIES_LABELS = {"refit-only": "refit only: the default before", "sizes-head-counts-distill1": "+ one distillation pass: the default now"}
PARTIES_VARIANTS = ("refit-only", "head-counts", "sizes-head-counts", "sizes-head-counts-distill1")


def parties_of(alpha: str, init: str = "shared") -> object:
    """K Dirichlet(alpha) CIFAR-10 parties from one initialisation (`init` shared) or each from its own, fused:
    accuracy against K (bench_parties.py, test)."""
    found = rows(ROOT / "bench" / "parties-cifar10-jpeg-w16.csv", split="test", alpha=alpha, init=init)
    found = [r for r in found if r["variant"] in PARTIES_VARIANTS]
    start = "from one start" if init == "shared" else "each from its own start"
    title = f"CIFAR-10 (JPEG copy), width 16, Dirichlet({alpha}) parties {start}: test accuracy against K"
    return parties_figure(found, title, PARTIES_LABELS)


@figure
def parties_cifar10() -> object:
    return parties_of("0.5")


@figure
def parties_cifar10_alpha01() -> object:
    return parties_of("0.1")


@figure
def parties_cifar10_own() -> object:
    return parties_of("0.5", init="own")


@figure
def parties_cifar10_alpha01_own() -> object:
    return parties_of("0.1", init="own")


@figure
def frontier_cifar100() -> object:
    """The shared CIFAR-100 pair's accuracy against compute: budgeted fusion beside the depth cuts (bench_budget.py)."""
    found = rows(ROOT / "bench" / "budget-cifar100-w32.csv")
    series = {
        "--budget: the least alike channels kept one per parent": [
            (float(r["flops_x"]), float(r["test_acc"]), f"{r['point']}x") for r in found if r["kind"] == "budget"
        ],
        "--merge-until: merged up to the cut, one branch per parent after it": [
            (float(r["flops_x"]), float(r["test_acc"]), r["point"]) for r in found if r["kind"] == "cut"
        ],
    }
    lines = {"ensemble of the two": float(found[0]["ensemble"])}
    mean = next((r["parents_mean"] for r in found if r.get("parents_mean")), "")
    if mean:
        lines["parents' mean"] = float(mean)
    return frontier_figure(series, lines, "CIFAR-100, ResNet18 width 32, two seeds on the same data: accuracy against compute")


def main(argv: list[str]) -> int:
    if argv:
        raise SystemExit(__doc__)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn in FIGURES.items():
        save_figure(fn(), OUT / f"{name}.png")
        print(f"docs/figures/{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
