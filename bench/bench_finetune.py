#!/usr/bin/env python
"""Measure fine-tuning's settings on the validation split (never the test set), one change at a time.

    python bench/bench_finetune.py FUSED.pt A.pt B.pt [--data-dir DIR] [--device cpu] [--only augment=True]

Each row fine-tunes FUSED (made by `otfuse fuse A.pt B.pt`) with `otfuse finetune`'s defaults
(FINETUNE in otfuse.train) plus one change, and reports the validation accuracy and seconds. The
last rows give the parents A and B the same fine-tuning with the defaults: the fair comparison
for "fused + K epochs", since a parent trained one epoch more also gains. The rows go to
bench/finetune-<dataset>-w<width>.csv; FINETUNE's values were chosen from these tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from otfuse.checkpoints import load_checkpoint, load_parents
from otfuse.data import dataset_slug
from otfuse.errors import run_main
from otfuse.options import parse_assignments
from otfuse.storage import atomic_write_csv
from otfuse.train import FINETUNE, TrainConfig, finetune

# one change from FINETUNE per row
CHANGES = [
    {},
    {"augment": True},
    {"lr": 0.02},
    {"lr": 0.1},
    {"label_smoothing": 0.0},
    {"batch_size": 128},
]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs=3, metavar="FUSED.pt A.pt B.pt")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--only", action="append", default=[], help="measure only these changes (repeatable); skips the parents")
    p.add_argument("--out-dir", default=str(Path(__file__).parent))
    args = p.parse_args(argv)

    def run() -> int:
        data_dir = args.data_dir
        _, metas, data = load_parents(args.checkpoints, data_dir, args.device)
        changes = [parse_assignments(c, TrainConfig) for c in args.only] or CHANGES
        jobs = [(args.checkpoints[0], "fused", c) for c in changes]
        if not args.only:
            jobs += [(path, f"parent {name}", {}) for path, name in zip(args.checkpoints[1:], "AB")]
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (start, label, change) in enumerate(jobs):
                t0 = time.perf_counter()
                out = finetune(start, Path(tmp) / f"{i}.pt", data_dir, args.device, data, **change)
                acc = load_checkpoint(out)[1]["val_acc"]
                rows.append({"start": label, "change": ",".join(f"{k}={v}" for k, v in change.items()) or "defaults",
                             "val_accuracy": f"{acc:.2f}", "seconds": f"{time.perf_counter() - t0:.1f}"})
                r = rows[-1]
                print(f"{r['start']:<9} {r['change']:<24} val {r['val_accuracy']:>6}%  {r['seconds']:>6} s", flush=True)
        meta = metas[1]
        seeds = "-".join(str(m.get("seed")) for m in metas[1:])
        out = Path(args.out_dir) / f"finetune-{dataset_slug(meta['dataset'])}-w{meta['width']}.csv"
        atomic_write_csv(out, [{"dataset": meta["dataset"], "width": meta["width"], "seeds": seeds, **r,
                                "defaults": json.dumps(FINETUNE, sort_keys=True)} for r in rows])
        print(f"wrote {out}")
        return 0

    return run_main(run)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
