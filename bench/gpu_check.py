#!/usr/bin/env python
"""The device path end to end: the same small workflow on CUDA and on the CPU, figure by figure.

    bench/gpu_check.sh                                   # on a CUDA machine: cuda and cpu, compared
    python bench/gpu_check.py --devices cpu              # the CPU half alone (what CI-size machines can run)
    python bench/gpu_check.py --dataset imagefolder:shared/data/cifar10-jpeg.tar.xz
    python bench/gpu_check.py --compare cuda.pt cpu.pt   # two saved fp32 fusions: maps, weights, accuracy

Per device: two width-16 seeds and one width-8 seed are trained for 2 epochs; then, from the
checkpoints trained on the first device (so that every device fuses the same weights), a fusion
at one width with every baseline, a fusion into `--width 8`, a fusion of mixed widths, one tune
trial and a 3-point interpolation. Every figure goes to a CSV row (check, figure, device, value),
and the table printed at the end sets each device beside the first, with the difference. Fusion
figures of the same weights should agree within a few tenths (bf16 rounding differs between the
devices' kernels); training figures differ more (different kernels, different weights).

Beyond the figures, one fusion runs in float32 on every device and is saved (`--records`): its maps
must be identical on every device (float32 means float32: TF32 is off wherever the maps are read),
its weights close and its accuracy within the tolerance. Any difference exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from otfuse.errors import OtfuseError, run_main
from otfuse.evaluate import accuracy
from otfuse.fusion import Fusion, fuse
from otfuse.inputs import fusion_inputs
from otfuse.interpolate import interpolation
from otfuse.precision import Precision
from otfuse.report import fusion_table
from otfuse.storage import atomic_write_csv, load_torch
from otfuse.train import TrainConfig, train
from otfuse.tune import TuneConfig, run_study

FUSION_TOLERANCE = 1.0  # points: the same weights fused on two devices (rounding of bf16 kernels differs)
WEIGHT_TOLERANCE = 1e-3  # the float32 fusion's tensors on two devices: max |a - b| over max |a|, per tensor


def fusion_record(fusion: Fusion, test_accuracy: float) -> dict:
    """What a float32 fusion must reproduce on another device: every map (by parent and group), the fused weights
    and the test accuracy; plain tensors, so the record loads with weights_only=True."""
    maps = {f"parent{i}/{name}": (m.perm if m.perm is not None else m.plan) for i, per in enumerate(fusion.maps) for name, m in per.items()}
    state = {k: v.detach().cpu() for k, v in fusion.fused.state_dict().items() if v.is_floating_point()}
    return {"maps": maps, "state": state, "test_accuracy": test_accuracy}


def compare_records(ref: dict, other: dict, name: str) -> list[str]:
    """One line per difference between two devices' float32 fusions: a map not identical (a permutation's channels
    that differ, or a soft plan beyond rounding), a tensor beyond WEIGHT_TOLERANCE, the accuracy beyond FUSION_TOLERANCE."""
    problems = []
    for key, a in ref["maps"].items():
        b = other["maps"].get(key)
        if b is None or b.shape != a.shape:
            problems.append(f"{name}: map {key} missing or of another shape")
        elif a.dtype == torch.long and not torch.equal(a, b.to(a.dtype)):
            problems.append(f"{name}: map {key} differs in {int((a != b).sum())} of {len(a)} channels")
        elif a.dtype != torch.long and not torch.allclose(a, b.to(a.dtype), rtol=1e-6, atol=1e-9):
            problems.append(f"{name}: soft map {key} differs by up to {float((a - b).abs().max()):.3g}")
    for key, a in ref["state"].items():
        b = other["state"].get(key)
        if b is None or b.shape != a.shape:
            problems.append(f"{name}: tensor {key} missing or of another shape")
            continue
        rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) if a.numel() else 0.0
        if not rel <= WEIGHT_TOLERANCE:
            problems.append(f"{name}: tensor {key} differs by {rel:.3g} of its largest value (tolerance {WEIGHT_TOLERANCE})")
    diff = abs(ref["test_accuracy"] - other["test_accuracy"])
    if not diff <= FUSION_TOLERANCE:
        problems.append(f"{name}: test accuracy {other['test_accuracy']:.2f} against {ref['test_accuracy']:.2f}")
    return problems


def load_record(path: str | Path) -> dict:
    record = load_torch(path, "fusion record")
    if not isinstance(record, dict) or not {"maps", "state", "test_accuracy"} <= set(record):
        raise OtfuseError(f"--compare: {path} is not a record this script saved; give a file from --records")
    return record


def run_device(
    device: str,
    dataset: str,
    data_dir: str,
    work: Path,
    parents: dict[str, Path] | None,
    epochs: int,
    precision: str,
    records: Path,
    quick: bool = False,
) -> tuple[list[dict], dict[str, Path]]:
    rows: list[dict] = []

    def add(check: str, figures: dict[str, float], seconds: float) -> None:
        for k, v in figures.items():
            rows.append({"check": check, "figure": k, "device": device, "value": f"{v:.4f}"})
        rows.append({"check": check, "figure": "seconds", "device": device, "value": f"{seconds:.2f}"})
        print(f"[{device}] {check}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()) + f" ({seconds:.1f} s)", flush=True)

    trained = {}
    seeds = (("w16s0", 16, 0), ("w16s1", 16, 1)) + (() if quick else (("w8s1", 8, 1),))
    for name, width, seed in seeds:
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

    t0 = time.perf_counter()
    exact = fusion_inputs([parents["w16s0"], parents["w16s1"]], {"precision": "fp32"}, data_dir=data_dir, device=device)
    fusion = fuse(exact.models, exact.data.train_x, exact.data.norm, exact.cfg, target=exact.target)
    record = fusion_record(fusion, accuracy(fusion.fused, exact.data.test_x, exact.data.test_y, exact.data.norm, Precision.FP32))
    records.mkdir(parents=True, exist_ok=True)
    torch.save(record, records / f"{device.replace(':', '-')}.pt")
    add("fuse fp32 (maps saved)", {"test_acc": record["test_accuracy"]}, time.perf_counter() - t0)

    def fused(names: list[str], width: int, check: str) -> None:
        t0 = time.perf_counter()
        inputs = fusion_inputs([parents[n] for n in names], {"precision": precision}, width=width, data_dir=data_dir, device=device)
        _, acc = fusion_table(inputs.models, inputs.data, inputs.cfg, "test", target=inputs.target)
        add(check, acc, time.perf_counter() - t0)

    fused(["w16s0", "w16s1"], 16, "fuse w16+w16 -> w16")
    if quick:
        return rows, trained
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
    return lines, bad


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="cuda,cpu", help="comma-separated; the first trains the checkpoints every device fuses")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--precision", default="auto")
    p.add_argument("--out", default=str(Path(__file__).parent / "gpu-check.csv"))
    p.add_argument("--quick", action="store_true", help="two seeds, the fp32 fusion and one fusion table only (a dry run)")
    p.add_argument("--records", default="", help="folder of each device's saved fp32 fusion (default: beside --out)")
    p.add_argument("--compare", nargs=2, metavar=("REF", "OTHER"), help="only compare two saved records; exit 1 on a difference")
    args = p.parse_args(argv)
    records = Path(args.records or Path(args.out).with_name(Path(args.out).stem + "-records"))

    def compared() -> int:
        problems = compare_records(load_record(args.compare[0]), load_record(args.compare[1]), Path(args.compare[1]).stem)
        print("\n".join(problems) or "the two fusions agree: maps identical, weights and accuracy within tolerance")
        return 1 if problems else 0

    def run() -> int:
        devices = [d for d in args.devices.split(",") if d]
        rows: list[dict] = []
        parents = None
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = args.data_dir or str(Path(tmp) / "data")
            for device in devices:
                got, trained = run_device(
                    device, args.dataset, data_dir, Path(tmp), parents, args.epochs, args.precision, records, args.quick
                )
                rows += got
                parents = parents or trained
                atomic_write_csv(args.out, rows, ["check", "figure", "device", "value"])
        lines, bad = compare(rows, devices)
        print("\n".join([f"{'check':<22} {'figure':<22} " + "  ".join(f"{d:>8}" for d in devices)] + lines))
        names = [d.replace(":", "-") for d in devices]
        problems = [
            p for n in names[1:] for p in compare_records(load_record(records / f"{names[0]}.pt"), load_record(records / f"{n}.pt"), n)
        ]
        print("\n".join(problems) or f"fp32 fusion: maps identical on {', '.join(devices)}, weights and accuracy within tolerance")
        print(f"wrote {args.out} and {records}/")
        return 1 if bad or problems else 0

    return run_main(compared if args.compare else run)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
