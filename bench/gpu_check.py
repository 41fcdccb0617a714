#!/usr/bin/env python
"""The device path end to end: the same small workflow on CUDA and on the CPU, figure by figure.

    bench/gpu_check.sh                                   # on a CUDA machine: cuda and cpu, compared
    python bench/gpu_check.py --devices cpu              # the CPU half alone (what CI-size machines can run)
    python bench/gpu_check.py --dataset imagefolder:shared/data/cifar10-jpeg.tar.xz

Per device: two width-16 seeds and one width-8 seed are trained for 2 epochs; then, from the
checkpoints trained on the first device (so that every device fuses the same weights), a fusion
at one width with every baseline, a fusion into `--width 8`, a fusion of mixed widths, one tune
trial and a 3-point interpolation. Every figure goes to a CSV row (check, figure, device, value),
and the table printed at the end sets each device beside the first, with the difference. Fusion
figures of the same weights should agree within a few tenths (bf16 rounding differs between the
devices' kernels); training figures differ more (different kernels, different weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from otfuse.errors import run_main
from otfuse.inputs import fusion_inputs
from otfuse.interpolate import interpolation
from otfuse.report import fusion_table
from otfuse.storage import atomic_write_csv
from otfuse.train import TrainConfig, train
from otfuse.tune import TuneConfig, run_study

FUSION_TOLERANCE = 1.0  # points: the same weights fused on two devices (rounding of bf16 kernels differs)


def run_device(
    device: str, dataset: str, data_dir: str, work: Path, parents: dict[str, Path] | None, epochs: int, precision: str
) -> tuple[list[dict], dict[str, Path]]:
    rows: list[dict] = []

    def add(check: str, figures: dict[str, float], seconds: float) -> None:
        for k, v in figures.items():
            rows.append({"check": check, "figure": k, "device": device, "value": f"{v:.4f}"})
        rows.append({"check": check, "figure": "seconds", "device": device, "value": f"{seconds:.2f}"})
        print(f"[{device}] {check}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()) + f" ({seconds:.1f} s)", flush=True)

    trained = {}
    for name, width, seed in (("w16s0", 16, 0), ("w16s1", 16, 1), ("w8s1", 8, 1)):
        t0 = time.perf_counter()
        cfg = TrainConfig(
            dataset=dataset,
            width=width,
            epochs=epochs,
            seed=seed,
            batch_size=128,
            lr=0.1,
            device=device,
            precision=precision,
            data_dir=data_dir,
            out=str(work / device / f"{name}.pt"),
        )
        path = train(cfg, progress=False)
        trained[name] = path
        meta = torch.load(path, weights_only=True)["meta"]
        add(f"train {name}", {"val_acc": meta["val_acc"], "test_acc": meta["test_acc"]}, time.perf_counter() - t0)
    parents = parents or trained  # every device fuses the first device's checkpoints

    def fused(names: list[str], width: int, check: str) -> None:
        t0 = time.perf_counter()
        inputs = fusion_inputs([parents[n] for n in names], {"precision": precision}, width=width, data_dir=data_dir, device=device)
        _, acc = fusion_table(inputs.models, inputs.data, inputs.cfg, "test", target=inputs.target)
        add(check, acc, time.perf_counter() - t0)

    fused(["w16s0", "w16s1"], 16, "fuse w16+w16 -> w16")
    fused(["w16s0", "w16s1"], 8, "fuse w16+w16 -> w8")
    fused(["w16s0", "w8s1"], 16, "fuse w16+w8 -> w16")
    t0 = time.perf_counter()
    inputs = fusion_inputs(
        [parents["w16s0"], parents["w16s1"]], {"precision": precision}, data_dir=data_dir, device=device, same_width=True
    )
    models, data = inputs.models, inputs.data
    out = run_study(models, data, inputs.metas, inputs.paths, TuneConfig(n_trials=1, results_dir=str(work / device / "tune")), inputs.cfg)
    add("tune 1 trial", {"val_accuracy": out["val_accuracy"], "test_accuracy": out["test_accuracy"]}, time.perf_counter() - t0)
    t0 = time.perf_counter()
    points = interpolation(models, data, inputs.cfg, points=3)
    add("interpolate 3 points", {f"{r['curve']}@{r['alpha']:.1f}": r["accuracy"] for r in points}, time.perf_counter() - t0)
    return rows, trained


def compare(rows: list[dict], devices: list[str]) -> list[str]:
    """Lines of the comparison table, each device beside the first; fusion figures beyond tolerance are flagged."""
    value = {(r["check"], r["figure"], r["device"]): float(r["value"]) for r in rows}
    lines, bad = [], 0
    for check, figure in dict.fromkeys((r["check"], r["figure"]) for r in rows):
        vals = [value.get((check, figure, d)) for d in devices]
        if figure == "seconds" or None in vals:
            lines.append(f"{check:<22} {figure:<22} " + "  ".join("-" if v is None else f"{v:8.2f}" for v in vals))
            continue
        diff = max(abs(v - vals[0]) for v in vals)
        flag = " <-- differs" if not check.startswith("train") and diff > FUSION_TOLERANCE else ""
        bad += bool(flag)
        lines.append(f"{check:<22} {figure:<22} " + "  ".join(f"{v:8.2f}" for v in vals) + f"  diff {diff:5.2f}{flag}")
    lines.append(f"{bad} fusion figure(s) differ by more than {FUSION_TOLERANCE} points between devices")
    return lines


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="cuda,cpu", help="comma-separated; the first trains the checkpoints every device fuses")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default=str(Path(__file__).parent / "gpu-check.csv"))
    args = p.parse_args(argv)

    def run() -> int:
        devices = [d for d in args.devices.split(",") if d]
        rows: list[dict] = []
        parents = None
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = args.data_dir or str(Path(tmp) / "data")
            for device in devices:
                got, trained = run_device(device, args.dataset, data_dir, Path(tmp), parents, args.epochs, args.precision)
                rows += got
                parents = parents or trained
                atomic_write_csv(args.out, rows, ["check", "figure", "device", "value"])
        print("\n".join([f"{'check':<22} {'figure':<22} " + "  ".join(f"{d:>8}" for d in devices)] + compare(rows, devices)))
        print(f"wrote {args.out}")
        return 0

    return run_main(run)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
