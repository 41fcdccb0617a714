#!/usr/bin/env python
"""Fine-tuning a fusion against fair baselines: the fused model and each parent given the same epochs and recipe.

    python bench/bench_finetune.py FUSED.pt A.pt B.pt                                  # the default grid
    python bench/bench_finetune.py FUSED.pt A.pt B.pt --run "fused,seed0: epochs=2 lr=0.02 augment=True distill=True"
    nohup python bench/bench_finetune.py FUSED.pt A.pt B.pt > ft.log &                 # hours on 2 cores: run it in the background

FUSED is `otfuse fuse A.pt B.pt --out FUSED.pt`; `vanilla` (the plain average of A and B with
BatchNorm recomputed and refit, made here), `transplant` (A and B side by side in a model twice as
wide, pruned back by magnitude: otfuse.transplant, made here) and the parents A (`seed<a>`) and B
(`seed<b>`) are the other starts, and five kinds of narrower start made here, `<kind>-w<width>`: `fused-w32` (A and B
fused into width 32), `pruned-w32` (A pruned to width 32 by Torch-Pruning's magnitude pruner), `fused-pruned-w32` (A and
B fused at their width, then pruned to 32 the same way), `transplant-w32` (A and B side by side, pruned to 32) and
`scratch-w32` (a fresh initialisation); any width works. A run is starts + TrainConfig options (FINETUNE, then these:
every start gets the same recipe, whatever defaults `otfuse finetune` would pick for it);
every distilled run learns from the ensemble of A and B. Each run writes one row per epoch on the
validation split (its accuracy after that epoch, from the run's history; epoch 0 is the start) and one on the test split
after the last epoch, to bench/finetune-<dataset>[-<arch>]-w<width>.csv, as soon as the run finishes. A run
whose rows are there is skipped, so a stopped sweep resumes. Choose recipes on `split=val` only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from harness import Table, common_options

from otfuse.checkpoints import fused_meta, load_checkpoint, save_checkpoint
from otfuse.errors import OtfuseError, run_main
from otfuse.fusion import fuse, vanilla_models
from otfuse.inputs import FusionInputs, fusion_inputs, target_model
from otfuse.options import flatten, parse_assignments
from otfuse.precision import resolve_precision
from otfuse.results import bench_stem
from otfuse.train import FINETUNE, TrainConfig, finetune
from otfuse.transplant import pruned, transplant

# (starts, options): every start of a run gets the same recipe; the fair comparison is within a run
GRID = [
    ("fused,seed0,seed1", "epochs=2 lr=0.02 augment=True"),
    ("fused,seed0,seed1", "epochs=2 lr=0.02 augment=True distill=True distill_weight=0.5"),
    ("fused,seed0,seed1", "epochs=4 lr=0.02 augment=True distill=True distill_weight=0.5"),
    ("vanilla", "epochs=2 lr=0.02 augment=True"),
]
FIELDS = ["start", "distill", "epochs", "epoch", "split", "acc", "seconds", "options", "dataset", "width"]


def parse_run(text: str) -> tuple[list[str], dict]:
    starts, _, options = text.partition(":")
    return [s.strip() for s in starts.split(",") if s.strip()], parse_assignments(",".join(options.split()), TrainConfig)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs=3, metavar="CKPT", help="FUSED.pt A.pt B.pt: the fusion and its two parents")
    p.add_argument(
        "--run", action="append", default=[], help='"starts: options", e.g. "fused,seed0: epochs=2 lr=0.02" (repeatable; default: the grid)'
    )
    common_options(p)
    args = p.parse_args(argv)

    def run() -> int:
        fused, a, b = args.checkpoints
        inputs = fusion_inputs([a, b], data_dir=args.data_dir, device=args.device, same_width=True)
        metas, data = inputs.metas, inputs.data
        fmeta = load_checkpoint(fused)[1]
        if fmeta.get("kind") != "fused":
            raise OtfuseError(
                f"{fused} is not a fused checkpoint (kind {fmeta.get('kind')!r}); make one with otfuse fuse A.pt B.pt --out FUSED.pt"
            )
        runs = [parse_run(r) for r in args.run] or [parse_run(f"{s}: {o}") for s, o in GRID]
        meta = metas[0]
        table = Table(Path(args.out_dir) / f"finetune-{bench_stem(meta, data)}.csv", ("start", "options", "epoch", "split"), FIELDS)
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"fused": fused, f"seed{metas[0]['seed']}": a, f"seed{metas[1]['seed']}": b}
            for starts, options in runs:
                opts = " ".join(f"{k}={v}" for k, v in sorted(options.items()))
                for start in starts:
                    if table.has(start=start, options=opts):
                        continue
                    if start not in paths:
                        made = made_start(start, inputs, Path(tmp) / f"{start}.pt")
                        if made is None:
                            raise OtfuseError(
                                f"--run: start {start!r} is unknown; choose {', '.join(sorted(paths) + sorted(MADE))} "
                                f"or {'/'.join(NARROW)}-w<width> (e.g. pruned-w32)"
                            )
                        paths[start] = made
                    teachers = {"teachers": f"{a},{b}"} if options.get("distill") else {}
                    t0 = time.perf_counter()
                    ck = finetune(
                        paths[start], Path(tmp) / "run.pt", args.data_dir, args.device, data, **{**FINETUNE, **options, **teachers}
                    )
                    seconds = time.perf_counter() - t0
                    ck_meta = load_checkpoint(ck)[1]
                    history = ck_meta["history"]
                    ck.unlink()
                    ck.with_suffix(".csv").unlink(missing_ok=True)  # its log too: the next run writes its own there
                    common = {
                        "start": start,
                        "distill": bool(options.get("distill")),
                        "epochs": len(history),
                        "options": opts,
                        "seconds": f"{seconds:.0f}",
                        "dataset": data.slug,
                        "width": meta["width"],
                    }
                    # epoch 0: the start itself, measured by the run's keep-start check
                    before = [{"epoch": 0, "val_acc": ck_meta["start_val_acc"]}] if "start_val_acc" in ck_meta else []
                    table.put(
                        *({**common, "epoch": h["epoch"], "split": "val", "acc": f"{h['val_acc']:.2f}"} for h in before + history),
                        {**common, "epoch": history[-1]["epoch"], "split": "test", "acc": f"{history[-1]['test_acc']:.2f}"},
                    )
                    print(
                        f"{start:<8} {opts:<70} val {history[-1]['val_acc']:.2f} test {history[-1]['test_acc']:.2f} ({seconds:.0f} s)",
                        flush=True,
                    )
        print(f"wrote {table.path}")
        return 0

    return run_main(run)


def _vanilla(inputs: FusionInputs, path: Path) -> Path:
    """The plain average of the parents, BatchNorm recomputed and refit with the fusion's defaults, saved to `path`."""
    models, metas, data, cfg = inputs.models, inputs.metas, inputs.data, inputs.cfg
    precision = resolve_precision(cfg.precision, next(models[0].parameters()).device)
    model = vanilla_models(models, cfg.model_weights(len(models)), data.train_x, data.norm, cfg, precision)["vanilla_refit"]
    save_checkpoint(path, model, {**fused_meta(metas, inputs.paths, inputs.width, flatten(cfg), None), "method": "vanilla"})
    return path


def _narrow(inputs: FusionInputs, path: Path, how: str, width: int = 32) -> Path:
    """A width-`width` start: the parents fused into it (`fused`), the first parent pruned to it by Torch-Pruning's
    magnitude pruner (`pruned`: every channel group cut by the same fraction, the least L1 norms go), the parents
    fused at their width then pruned to it the same way (`fused-pruned`), or a fresh initialisation (`scratch`),
    saved to `path` as a fused checkpoint of the parents (so distillation finds them)."""
    models, metas, data, cfg = inputs.models, inputs.metas, inputs.data, inputs.cfg
    target = target_model(metas[0], width, next(models[0].parameters()).device)
    ratio = 1 - width / metas[0]["width"]
    if how == "fused":
        target = fuse(models, data.train_x, data.norm, cfg, target=target).fused
    elif how == "pruned":
        target = pruned(models[0], target, ratio, data.train_x, data.norm, p=1)
    elif how == "fused-pruned":
        target = pruned(fuse(models, data.train_x, data.norm, cfg).fused, target, ratio, data.train_x, data.norm, p=1)
    save_checkpoint(path, target, {**fused_meta(metas, inputs.paths, width, flatten(cfg), None), "method": how})
    return path


def _transplant(inputs: FusionInputs, path: Path, width: int | None = None) -> Path:
    """The parents side by side in a model twice as wide, pruned by magnitude to `width` (default: theirs), BatchNorm
    recomputed (otfuse.transplant), saved to `path` as a fused checkpoint of the parents."""
    models, metas, data, cfg = inputs.models, inputs.metas, inputs.data, inputs.cfg
    device = next(models[0].parameters()).device
    width = width or inputs.width
    wide = target_model(metas[0], len(models) * inputs.width, device)
    start = transplant(
        models,
        wide,
        target_model(metas[0], width, device),
        data.train_x,
        data.norm,
        cfg.bn,
        resolve_precision(cfg.precision, device),
        ratio=1 - width / (len(models) * inputs.width),
    )
    save_checkpoint(path, start, {**fused_meta(metas, inputs.paths, width, flatten(cfg), None), "method": "transplant"})
    return path


# starts made here from the parents: the plain average and neuron transplantation at their width, and narrower
# starts for a compressed model, named `<kind>-w<width>` (e.g. `pruned-w32`)
MADE = {"vanilla": _vanilla, "transplant": _transplant}
NARROW = ("fused", "pruned", "fused-pruned", "transplant", "scratch")


def made_start(name: str, inputs: FusionInputs, path: Path) -> Path | None:
    """Start `name` made from the parents and saved to `path`, or None when the name is not one made here."""
    if name in MADE:
        return MADE[name](inputs, path)
    kind, _, width = name.rpartition("-w")
    if kind not in NARROW or not width.isdigit() or int(width) < 1:
        return None
    widest = {"pruned": inputs.width, "fused-pruned": inputs.width, "transplant": len(inputs.models) * inputs.width}.get(kind)
    if widest is not None and int(width) >= widest:
        raise OtfuseError(f"--run: start {name!r} prunes to width {width}, which is not below {widest}; give a smaller width")
    if kind == "transplant":
        return _transplant(inputs, path, width=int(width))
    return _narrow(inputs, path, how=kind, width=int(width))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
