#!/usr/bin/env python
"""Every classification architecture in torchvision: group its channels, permute them at random, compare outputs.

    python bench/bench_zoo.py [--only resnext50_32x4d,convnext_tiny] [--size 224] [--time-limit 120]

Each model is built with random weights and random BatchNorm statistics (num_classes=10), grouped
on one image, permuted with random maps and run on two images. A row is `exact` (largest output
difference relative to the largest output), `refused` (the project's own one-line error, quoted)
or `crash` (any other exception: a bug). Rows go to bench/zoo-torchvision.csv with the seconds each
step took; with --only, the listed models' rows are replaced and the others kept.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
import torchvision

from otfuse.errors import OtfuseError
from otfuse.groups import channel_groups
from otfuse.maps import permute, random_maps
from otfuse.storage import atomic_write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import randomize_bn  # noqa: E402  (the tests' own randomiser: one way to do it)


def check(name: str, size: int, limit: float) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    kwargs = {"num_classes": 10}
    if name.startswith(("inception", "googlenet")):
        kwargs.update(aux_logits=False, init_weights=False)
    model = randomize_bn(torchvision.models.get_model(name, **kwargs)).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    row = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "build_s": f"{time.perf_counter() - t0:.1f}"}
    try:
        t1 = time.perf_counter()
        groups = channel_groups(model, x[:1], time_limit=limit)
        t2 = time.perf_counter()
        out = permute(model, groups, random_maps(groups, seed=3))
        t3 = time.perf_counter()
        with torch.no_grad():
            a, b = model(x), out(x)
        err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
        row.update(result="exact" if err <= 1e-4 else "WRONG", groups=len(groups), rel_error=f"{err:.1e}",
                   groups_s=f"{t2 - t1:.1f}", permute_s=f"{t3 - t2:.1f}", message="")
    except OtfuseError as exc:
        row.update(result="refused", message=str(exc)[:300])
    except Exception as exc:  # what the bench is for: anything but the project's own error is a bug
        row.update(result="crash", message=f"{type(exc).__name__}: {str(exc)[:200]}")
    row["total_s"] = f"{time.perf_counter() - t0:.1f}"
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help="comma-separated model names (default: every classification model)")
    p.add_argument("--size", type=int, default=224, help="image side (default: 224, what every model accepts)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds channel_groups may take per model (default: 120)")
    p.add_argument("--out", default=str(Path(__file__).parent / "zoo-torchvision.csv"))
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or torchvision.models.list_models(module=torchvision.models)
    rows = []
    for name in names:
        rows.append(check(name, args.size, args.time_limit))
        r = rows[-1]
        print(f"{name:<22} {r['result']:<8} {r.get('rel_error', ''):>8} {r['total_s']:>6} s  {r['message'][:110]}", flush=True)
    fields = ["model", "result", "rel_error", "groups", "parameters", "build_s", "groups_s", "permute_s", "total_s", "message"]
    if args.only and Path(args.out).is_file():  # a rerun of some models updates their rows and keeps the others
        with open(args.out, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r["model"] not in {r2["model"] for r2 in rows}]
        rows = sorted(kept + rows, key=lambda r: r["model"])
    atomic_write_csv(args.out, rows, fields)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {sum(r['result'] == k for r in rows)}" for k in ("exact", "refused", "crash", "WRONG")))
    return 0 if not any(r["result"] in ("crash", "WRONG") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
