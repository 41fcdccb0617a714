"""Results tables: one CSV per dataset and method, rows upserted atomically, and results/summary.md.

    python run_activation_based_fusion.py --dataset fashion-mnist
    python run_weight_based_fusion.py --method weight-matching

For every dataset and architecture with two or more trained seeds under checkpoint/, each pair
is fused and one row written to results/<dataset>_<method>.csv; summary.md lays the means out
like the original repository's table, with the ensemble and vanilla averaging beside them.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import re
import sys
import time
from pathlib import Path

from otfuse.data import load_dataset
from otfuse.errors import OtfuseError
from otfuse.storage import atomic_write_bytes, atomic_write_csv, atomic_write_text

KEY = ("dataset", "arch", "width", "seeds")
ACCURACIES = ("model1", "model2", "ensemble", "vanilla", "vanilla_bn", "vanilla_refit", "fused_no_bn", "fused_average",
              "fused", "fused_repair", "fused_ft", "agree_model1", "agree_model2")
PHASES = ("activations", "cost_and_ot", "averaging", "batchnorm", "repair", "refit", "evaluation", "finetune")


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def upsert_row(path: Path, row: dict) -> None:
    """Replace the row with the same key (or append), rewriting the file atomically."""
    rows = [r for r in read_rows(path) if tuple(str(r.get(k)) for k in KEY) != tuple(str(row[k]) for k in KEY)]
    rows.append({k: str(v) for k, v in row.items()})
    atomic_write_csv(path, rows, list(dict.fromkeys(c for r in rows for c in r)))


def fusion_row(dataset: str, meta: dict, seeds: list, method: str, acc: dict, timings: dict, options: dict) -> dict:
    row = {"dataset": dataset, "arch": meta["arch"], "width": meta["width"], "seeds": "-".join(str(s) for s in seeds), "method": method}
    row.update({k: f"{acc[k]:.2f}" for k in ACCURACIES if k in acc})
    row.update({f"s_{p}": f"{timings.get(p, 0.0):.2f}" for p in PHASES})
    row["options"] = json.dumps(options, sort_keys=True)
    return row


def write_summary(results_dir: Path) -> Path:
    """results/summary.md: per dataset and model, mean accuracies over pairs for every method run."""
    by_model: dict[tuple, dict[str, list[dict]]] = {}
    for path in sorted(results_dir.glob("*_*.csv")):
        for r in read_rows(path):
            if "fused" in r and "method" in r:
                by_model.setdefault((r["dataset"], r["arch"], r["width"]), {}).setdefault(r["method"], []).append(r)
    methods = [m for m in ("activation", "weight", "weight-matching") if any(m in v for v in by_model.values())]
    title = {"activation": "Activation-base Fusion", "weight": "Weights-base Fusion", "weight-matching": "Weight matching"}
    short = {"activation": "Activation", "weight": "Weights", "weight-matching": "Weight matching"}
    rows_of = lambda m: [r for v in by_model.values() for r in v.get(m, [])]
    # (header, method, CSV column): the stage columns appear once some run has them
    cols = [(title[m], m, "fused") for m in methods]
    cols += [(f"{short[m]}, average only", m, "fused_average") for m in methods if any(r.get("fused_average") for r in rows_of(m))]
    cols += [(f"{short[m]} + REPAIR", m, "fused_repair") for m in methods if any(r.get("fused_repair") for r in rows_of(m))]
    epochs = sorted({r.get("finetune_epochs") for m in methods for r in rows_of(m) if r.get("fused_ft")})
    cols += [(f"{short[m]} + {'/'.join(epochs)} ep fine-tuning", m, "fused_ft") for m in methods if any(r.get("fused_ft") for r in rows_of(m))]
    refit_col = [("Vanilla + refit", "vanilla_refit")] if any(r.get("vanilla_refit") for m in methods for r in rows_of(m)) else []
    head = ["Dataset", "Model", "Pairs", "Model1", "Model2"] + [c[0] for c in cols] + ["Ensemble", "Vanilla", "Vanilla + BN"]
    head += [h for h, _ in refit_col]
    lines = ["# Fusion results", "",
             "Test accuracy (%), mean over the fused pairs. A method's own column is the fusion with the options "
             "it ran with (by default: aligned average, BatchNorm recomputed, then the layer-wise refit); "
             "\"average only\" is the aligned average with BatchNorm recomputed; \"+ REPAIR\" is that with REPAIR "
             "instead of the refit. No fine-tuning except in the fine-tuning columns.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    mean = lambda rows, k: f"{sum(float(r[k]) for r in rows) / len(rows):.2f}" if rows and all(r.get(k) for r in rows) else "-"
    for (dataset, arch, width), runs in sorted(by_model.items()):
        any_rows = next(iter(runs.values()))
        cells = [dataset, f"{arch} w{width}", str(len(any_rows)), mean(any_rows, "model1"), mean(any_rows, "model2")]
        cells += [mean(runs.get(m, []), k) for _, m, k in cols]
        cells += [mean(any_rows, "ensemble"), mean(any_rows, "vanilla"), mean(any_rows, "vanilla_bn")]
        cells += [mean(any_rows, k) for _, k in refit_col]
        lines.append("| " + " | ".join(cells) + " |")
    path = results_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def finetuned_accuracy(fused_path: Path, epochs: int, data_dir: str, device: str) -> float:
    """Test accuracy of the fused checkpoint after `epochs` of fine-tuning (saved beside it, -ft<K>.pt)."""
    from otfuse.models import load_checkpoint
    from otfuse.train import finetune

    out = finetune(fused_path, fused_path.with_name(f"{fused_path.stem}-ft{epochs}.pt"), data_dir, device, epochs=epochs)
    return float(load_checkpoint(out)[1]["test_acc"])


def trained_sets(checkpoint_dir: Path, dataset: str | None) -> list[tuple[Path, list[Path]]]:
    """Folders <dataset>/<arch>-w<width>/ holding two or more seed<k>.pt checkpoints."""
    out = []
    for folder in sorted(p for p in checkpoint_dir.glob("*/*") if p.is_dir()):
        if dataset and folder.parent.name != dataset:
            continue
        seeds = sorted(folder.glob("seed*.pt"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        if len(seeds) >= 2:
            out.append((folder, seeds))
    return out


def sweep(argv: list[str] | None, default_method: str) -> int:
    """The two fusion scripts: fuse every pair of trained seeds, upsert CSV rows, rewrite summary.md."""
    from otfuse.cli import add_fuse_options, fuse_config_from_args, given_options, run_main
    from otfuse.fuse import fusion_report
    from otfuse.models import load_checkpoint, save_checkpoint
    from otfuse.train import pick_device

    p = argparse.ArgumentParser(description=f"Fuse every pair of trained seeds ({default_method}-based) and write results/.")
    p.add_argument("--dataset", default=None, help="folder name under checkpoint/ (default: all)")
    p.add_argument("--pairs", default="", help="seed pairs, e.g. 0-1,0-2 (default: every pair)")
    p.add_argument("--checkpoint-dir", default="checkpoint")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--finetune-epochs", type=int, default=0, help="also fine-tune each fused model this many epochs (otfuse finetune's defaults) and report it")
    add_fuse_options(p, default_method)
    args = p.parse_args(argv)
    args._given = given_options(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        cfg = fuse_config_from_args(args)
        device = pick_device(args.device)
        results = Path(args.results_dir)
        sets = trained_sets(Path(args.checkpoint_dir), args.dataset)
        if not sets:
            raise OtfuseError(f"no folder under {args.checkpoint_dir}/ holds two or more seed*.pt checkpoints; train them first (run_train_all.sh)")
        wanted = {tuple(s.split("-")) for s in args.pairs.split(",") if s}
        for folder, paths in sets:
            loaded = [load_checkpoint(pth) for pth in paths]
            meta0 = loaded[0][1]
            data = load_dataset(meta0["dataset"], args.data_dir).to(device)
            for i, j in itertools.combinations(range(len(paths)), 2):
                seeds = [loaded[i][1]["seed"], loaded[j][1]["seed"]]
                if wanted and tuple(str(s) for s in seeds) not in wanted:
                    continue
                models = [loaded[i][0].to(device), loaded[j][0].to(device)]
                print(f"{folder}: fusing seeds {seeds[0]} and {seeds[1]} ({cfg.method})", flush=True)
                fused, acc, timings = fusion_report(models, data, cfg, progress=True)
                meta = {**meta0, "kind": "fused", "method": cfg.method, "options": dict(cfg.__dict__),
                        "parents": [str(paths[i]), str(paths[j])], "test_acc": acc["fused"]}
                meta.pop("history", None), meta.pop("config", None)
                fused_path = folder / f"fused-{cfg.method}-seeds{seeds[0]}-{seeds[1]}.pt"
                save_checkpoint(fused_path, fused, meta)
                if args.finetune_epochs > 0:
                    t0 = time.perf_counter()
                    acc["fused_ft"] = finetuned_accuracy(fused_path, args.finetune_epochs, args.data_dir, args.device)
                    timings["finetune"] = time.perf_counter() - t0
                row = fusion_row(folder.parent.name, meta0, seeds, cfg.method, acc, timings, cfg.__dict__)
                if args.finetune_epochs > 0:
                    row["finetune_epochs"] = args.finetune_epochs
                upsert_row(results / f"{folder.parent.name}_{cfg.method}.csv", row)
                print("  " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
        print(write_summary(results).read_text())
        return 0

    return run_main(run)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: plots are written, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
