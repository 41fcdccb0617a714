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

from otfuse.plots import interpolation_figure, save_figure

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


@figure
def fusion_w64() -> object:
    """The line between the shared width-64 pair (vanilla and aligned), with the default fusion and the ensemble."""
    interp = rows(ROOT / "results" / "interp-imagefolder-cifar10-jpeg-resnet18-w64-seeds0-1.csv")
    curves = [{"alpha": float(r["alpha"]), "curve": r["curve"], "accuracy": float(r["accuracy"]), "loss": float(r["loss"])} for r in interp]
    scale = rows(ROOT / "bench" / "scale-cifar10-jpeg-w64.csv", row="default", precision="fp32", split="test")[0]
    marks = {"default fusion (otfuse fuse)": float(scale["fused"]), "ensemble of the two": float(scale["ensemble"])}
    title = (
        "ResNet18 width 64, CIFAR-10 (JPEG copy), test: the weights between two independently trained models,\n"
        "vanilla and OT-aligned (BatchNorm reset at each point), against what otfuse fuse makes of them"
    )
    return interpolation_figure(curves, title, "test", marks)


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
