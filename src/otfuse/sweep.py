"""The fusion scripts: fuse every pair of trained seeds under checkpoint/, write results/ tables.

    python run_activation_based_fusion.py --dataset fashion-mnist
    python run_weight_based_fusion.py --method weight-matching --pairs 0-1

For every dataset and architecture with two or more trained seeds under checkpoint/ (checkpoints
whose metadata says `kind: trained`: fine-tuned and fused ones are never taken for seeds), each
pair is fused and one row written to results/<dataset>_<method>.csv; summary.md lays the means
out like the original repository's table, with the ensemble and vanilla averaging beside them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

from otfuse.align import METHODS
from otfuse.checkpoints import finetuned_from, fused_from, fused_meta, load_checkpoint, pick_device, save_checkpoint
from otfuse.errors import OtfuseError, run_main
from otfuse.evaluate import accuracy_of_logits, ensemble_of_logits, logits
from otfuse.fusion import FuseConfig, Fusion
from otfuse.inputs import FusionInputs, check_request, fusion_inputs
from otfuse.models import arch_folder
from otfuse.options import Parser, add_options, flatten
from otfuse.partial import MERGE_UNTIL_HELP, chosen_cuts, partial_rows
from otfuse.plots import finetune_figure, is_own_figure, partial_figure, save_figure
from otfuse.report import fusion_table
from otfuse.results import KEY, SPLIT_KEY, fusion_row, is_own_summary, split_row, upsert_row, upsert_rows, write_summary
from otfuse.storage import check_outputs, load_torch, output_lock, writable_dir
from otfuse.subsets import complement, subset_of
from otfuse.train import finetune, is_log_of

# the fine-tuning columns: (CSV column, checkpoint suffix, changes to otfuse finetune's defaults, which follow the
# checkpoint): the default recipe, and label-free distillation from the parents' ensemble
FINETUNES = (("fused_ft", "", {}), ("fused_ft_distill", "-distill", {"distill": True, "distill_weight": 1.0}))
# results/finetune-<dataset>.csv: one row per fusion, start, recipe, epoch and split
CURVE_KEY = (*KEY, "method", "start", "recipe", "epoch", "split")
# a fine-tuning run's recipe: what the fair comparison gives every start alike
RECIPE = (
    "epochs",
    "batch_size",
    "lr",
    "warmup",
    "optimizer",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "augment",
    "distill",
    "temperature",
    "distill_weight",
    "precision",
)


def trained_seeds(checkpoint_dir: Path, dataset: str | None) -> dict[tuple[str, str, int], list[tuple[Path, dict]]]:
    """Trained seeds by (dataset folder, arch, width), from the folders <dataset>/<arch>-w<width>/, sorted by seed (and
    part). A checkpoint counts as a seed only if its metadata says `kind: trained`."""
    out: dict[tuple[str, str, int], list[tuple[Path, dict]]] = {}
    for folder in sorted(p for p in checkpoint_dir.glob("*/*") if p.is_dir()):
        if dataset and folder.parent.name != dataset:
            continue
        for path in sorted(p for p in folder.glob("*.pt") if not p.name.startswith(".")):
            try:
                ckpt = load_torch(path)
            except OtfuseError as exc:  # a stray or half-copied file beside the seeds: said, and left out
                print(f"skipping {path}: {exc}", file=sys.stderr)
                continue
            meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
            if (
                isinstance(meta, dict)
                and meta.get("kind") == "trained"
                and isinstance(meta.get("seed"), int)
                and isinstance(meta.get("width", 0), int)
            ):
                out.setdefault((folder.parent.name, str(meta.get("arch")), int(meta.get("width", 0))), []).append((path, meta))
    for seeds in out.values():
        seeds.sort(key=lambda pm: (pm[1]["seed"], _part(pm[1])))
        for (p, m), (q, n) in zip(seeds, seeds[1:]):
            if (m["seed"], _part(m)) == (n["seed"], _part(n)):
                raise OtfuseError(
                    f"{p} and {q} are both seed {m['seed']}{' on ' + _part(m) if _part(m) else ''}; keep one of them in "
                    f"{p.parent} (move the other away)"
                )
    return out


def _part(meta: dict) -> str:
    """The part of the data a seed trained on, as a name (`c0-49`, `c0-4-b0.8`); empty for all of it."""
    part = subset_of(meta)
    return part.tag if part else ""


def _pairs(seeds: list[tuple[Path, dict]]) -> list[list[tuple[Path, dict]]]:
    """Every pair of different seeds trained on all the data; of parties (seeds trained on parts of it), every pair
    of different seeds whose parts are complementary (SPLIT=disjoint or biased in run_train_all.sh), the party of
    the first class first."""
    whole = [s for s in seeds if not _part(s[1])]
    parties = [s for s in seeds if _part(s[1])]
    out = [[a, b] for a, b in itertools.combinations(whole, 2) if a[1]["seed"] != b[1]["seed"]]
    return out + [
        [a, b]
        for a in parties
        for b in parties
        if a[1]["seed"] != b[1]["seed"]
        and min(subset_of(a[1]).classes) == 0
        and subset_of(b[1]) == complement(subset_of(a[1]), a[1]["num_classes"])
    ]


def pairs_to_fuse(
    checkpoint_dir: Path, dataset: str | None, widths: tuple[int, int] | None, wanted: set[tuple[int, int]]
) -> list[tuple[str, list[tuple[Path, dict]]]]:
    """(dataset folder, [first parent, second parent]) for every pair to fuse: pairs of seeds of one width (parties
    trained on parts of the data: each with every party of another part and seed), or with `widths` (a, b), every
    seed of width a with every other seed of width b."""
    seeds = trained_seeds(checkpoint_dir, dataset)
    jobs = []
    for (ds, arch, width), first in seeds.items():
        if widths is None:
            jobs += [(ds, pair) for pair in _pairs(first)]
        elif width == widths[0]:
            second = seeds.get((ds, arch, widths[1]), [])
            jobs += [(ds, [a, b]) for a in first for b in second if a[1]["seed"] != b[1]["seed"]]
    if not jobs:
        what = f"seeds of widths {widths[0]} and {widths[1]}" if widths else "two or more trained seeds of one width"
        raise OtfuseError(f"no folder under {checkpoint_dir}/ holds {what}; train them first (run_train_all.sh)")
    chosen = [(ds, pair) for ds, pair in jobs if not wanted or (pair[0][1]["seed"], pair[1][1]["seed"]) in wanted]
    if not chosen:
        found = sorted({m["seed"] for _, pair in jobs for _, m in pair})
        raise OtfuseError(
            f"--pairs {','.join(f'{a}-{b}' for a, b in sorted(wanted))!r} matches no pair of trained seeds "
            f"(seeds found: {found}); e.g. --pairs {found[0]}-{found[-1]}"
        )
    return chosen


def parse_pairs(text: str) -> set[tuple[int, int]]:
    """'0-1,0-2' -> {(0, 1), (0, 2)}; one clear error for anything else."""
    pairs = set()
    for item in filter(None, text.split(",")):
        parts = item.split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise OtfuseError(f"--pairs {text!r}: write seed pairs as A-B, comma-separated, e.g. 0-1,0-2")
        pairs.add((int(parts[0]), int(parts[1])))
    return pairs


def parser(default_method: str) -> argparse.ArgumentParser:
    p = Parser(description=f"Fuse every pair of trained seeds ({default_method}-based) and write results/.")
    p.add_argument("--dataset", default=None, help="folder name under checkpoint/ (default: all)")
    p.add_argument("--pairs", default="", help="seed pairs, e.g. 0-1,0-2 (default: every pair)")
    p.add_argument(
        "--checkpoint-dir", default="checkpoint", help="where the trained seeds are, <dataset>/<arch>-w<width>/ (default: checkpoint)"
    )
    p.add_argument("--results-dir", default="results", help="where the CSV tables and summary.md go (default: results)")
    p.add_argument(
        "--widths", default="", help="fuse parents of two widths, e.g. 16,8: every seed of the first with every other seed of the second"
    )
    p.add_argument("--width", type=int, default=0, help="width of the fused models (default 0: the first parent's)")
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        help="also fine-tune each fused model this many epochs (otfuse finetune's defaults) and report it",
    )
    p.add_argument(
        "--finetune-distill",
        action="store_true",
        help="with --finetune-epochs: also fine-tune by label-free "
        "distillation from the parents (otfuse finetune --distill), its own column",
    )
    p.add_argument(
        "--merge-until",
        default="",
        help=MERGE_UNTIL_HELP.replace("also report", "also measure") + "; rows go to results/partial-<dataset>.csv and a plot to .png",
    )
    p.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate every stage and baseline beside the fusion (default: on; --no-baselines: the fused model only)",
    )
    p.add_argument("--config", default="", help="JSON of fusion options (e.g. otfuse tune's best); options given here override it")
    p.add_argument("--device", default="auto", help="auto: cuda when available")
    p.add_argument("--data-dir", default=None, help="dataset cache (default: $OTFUSE_DATA_DIR or ~/.cache/otfuse)")
    p.add_argument("--verbose", action="store_true", help="also show other libraries' warnings (PyTorch, POT, optuna)")
    add_options(p, FuseConfig, {"method": default_method}, only_given=True, helps={"method": " | ".join(METHODS)})
    return p


def main(argv: list[str] | None, default_method: str) -> int:
    args = parser(default_method).parse_args(sys.argv[1:] if argv is None else argv)
    return run_main(lambda: sweep(args, default_method), verbose=args.verbose)


def parse_widths(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise OtfuseError(f"--widths {text!r}: give the two parents' widths, e.g. --widths 16,8")
    return int(parts[0]), int(parts[1])


def sweep(args: argparse.Namespace, default_method: str) -> int:
    if "method" not in vars(args) and not args.config:
        args.method = default_method
    check_request(2, args.width, vars(args), args.config)
    if args.finetune_epochs < 0:
        raise OtfuseError(f"--finetune-epochs {args.finetune_epochs} must be 0 (none) or more")
    if args.finetune_distill and args.finetune_epochs < 1:
        raise OtfuseError("--finetune-distill fine-tunes: give --finetune-epochs 1 (or more) too")
    pick_device(args.device)
    results = writable_dir(args.results_dir)  # before any work: an unwritable folder must not cost a fusion
    jobs = pairs_to_fuse(Path(args.checkpoint_dir), args.dataset, parse_widths(args.widths), parse_pairs(args.pairs))
    datasets = sorted({ds for ds, _ in jobs})
    figures = [f"finetune-{d}.png" for d in datasets if args.finetune_epochs] + [f"partial-{d}.png" for d in datasets if args.merge_until]
    # the summary and plots follow every output's rule: an existing file is replaced only when a fusion script wrote it
    check_outputs(
        {"the summary": results / "summary.md", **{f"the plot {n}": results / n for n in figures}},
        {},
        own=lambda p: is_own_summary(p) if p.suffix == ".md" else is_own_figure(p),
        fix="move it away, or give another --results-dir",
    )
    with output_lock(results / "summary.md"):  # one sweep at a time writes a results folder: rows are read, then replaced
        return _sweep(args, jobs, results)


def _teachers(extra: dict, parents: list[Path]) -> dict:
    """Distillation learns from the parents' ensemble, whichever model starts it."""
    return {"teachers": ",".join(str(p) for p in parents)} if extra.get("distill") else {}


def finetune_curves(
    fusion: Fusion, inputs: FusionInputs, parents: list[Path], tuned: dict, finetunes: tuple, args: argparse.Namespace, key: dict
) -> list[dict]:
    """Rows of results/finetune-<dataset>.csv: validation accuracy after every epoch (0: the start) and test at the end,
    for the fused model (already fine-tuned: `tuned`), each parent and vanilla averaging + refit given the same epochs
    and recipe, and the parents' ensemble (validation)."""
    x, y = inputs.data.split("val")
    parent_logits = [logits(m, x, inputs.data.norm, precision=fusion.precision) for m in inputs.models]
    rows = [
        {
            **key,
            "start": "ensemble",
            "recipe": "",
            "epoch": 0,
            "split": "val",
            "acc": f"{accuracy_of_logits(ensemble_of_logits(parent_logits, fusion.weights), y):.2f}",
        }
    ]
    with tempfile.TemporaryDirectory() as tmp:
        starts = {f"seed{m['seed']}": p for p, m in zip(parents, inputs.metas)}
        columns = fusion.columns(args.baselines)
        if "vanilla_refit" in columns:
            starts["vanilla"] = Path(tmp) / "vanilla.pt"
            save_checkpoint(
                starts["vanilla"],
                columns["vanilla_refit"],
                {**fused_meta(inputs.metas, parents, inputs.width, flatten(inputs.cfg), None), "method": "vanilla"},
            )
        for column, suffix, _ in finetunes:
            # the fused model's recipe as it ran (its defaults follow the checkpoint), given to every other start
            ran = load_checkpoint(tuned[("fused", column)])[1]["config"]
            recipe = {k: ran[k] for k in RECIPE}
            for start, path in starts.items():
                tuned[(start, column)] = finetune(
                    path,
                    Path(tmp) / f"{start}{suffix}-ft.pt",
                    args.data_dir,
                    args.device,
                    overwrite=True,
                    progress=True,
                    **recipe,
                    **_teachers(recipe, parents),
                )
        for (start, column), path in tuned.items():
            meta = load_checkpoint(path)[1]
            ran = meta["config"]
            common = {
                **key,
                "start": start,
                "recipe": "distill" if column.endswith("distill") else "default",
                "options": " ".join(f"{k}={ran[k]}" for k in RECIPE),
            }
            if "start_val_acc" in meta:  # no validation split: no curve before the last epoch's test
                rows.append({**common, "epoch": 0, "split": "val", "acc": f"{meta['start_val_acc']:.2f}"})
            rows += [{**common, "epoch": h["epoch"], "split": "val", "acc": f"{h['val_acc']:.2f}"} for h in meta["history"]]
            rows.append({**common, "epoch": meta["history"][-1]["epoch"], "split": "test", "acc": f"{meta['history'][-1]['test_acc']:.2f}"})
    return rows


def write_curves(results: Path, dataset: str, rows: list[dict], title: str) -> None:
    """results/finetune-<dataset>.csv (rows upserted) and its PNG (these rows' curves)."""
    upsert_rows(results / f"finetune-{dataset}.csv", rows, CURVE_KEY)
    save_figure(finetune_figure([{k: str(v) for k, v in r.items()} for r in rows], title), results / f"finetune-{dataset}.png")


def _finetuned_path(fused: Path, epochs: int, suffix: str) -> Path:
    return fused.with_name(f"{fused.stem}-ft{epochs}{suffix}.pt")


def _finetuned_paths(fused: Path, epochs: int, finetunes: tuple) -> list[Path]:
    """The checkpoints --finetune-epochs writes beside the fused one (the names otfuse finetune would give them)."""
    return [_finetuned_path(fused, epochs, suffix) for _, suffix, _ in finetunes]


def write_partial(results: Path, dataset: str, key: dict, acc: dict[str, float], rows: list[dict], title: str) -> None:
    """results/partial-<dataset>.csv (rows upserted per fusion, `key`, and cut) and its plot: accuracy against cost per
    cut, the parents and their ensemble as lines."""
    upsert_rows(
        results / f"partial-{dataset}.csv",
        [{**key, **{k: f"{v:.4g}" if isinstance(v, float) else v for k, v in r.items()}} for r in rows],
        (*KEY, "method", "parts", "fusion_data", "cut"),
    )
    lines = {f"parent {i + 1}": acc[f"model{i + 1}"] for i in range(2) if f"model{i + 1}" in acc}
    lines.update({"ensemble (softmax mean)": acc["ensemble"]} if "ensemble" in acc else {})
    save_figure(partial_figure(rows, lines, title), results / f"partial-{dataset}.png")


def _sweep(args: argparse.Namespace, jobs: list, results: Path) -> int:
    finetunes = () if args.finetune_epochs == 0 else FINETUNES if args.finetune_distill else FINETUNES[:1]
    for ds, pair in jobs:
        # the checks `otfuse fuse` makes: one architecture, class count, dataset and validation split
        inputs = fusion_inputs([p for p, _ in pair], vars(args), args.config, args.width, args.data_dir, args.device)
        cfg, meta0, width, method = inputs.cfg, inputs.metas[0], inputs.width, inputs.cfg.align.method
        folder = writable_dir(Path(args.checkpoint_dir) / ds / arch_folder(meta0["arch"], width))
        seeds, widths = [m["seed"] for _, m in pair], [m["width"] for _, m in pair]
        mixed = len(set(widths + [width])) > 1
        print(
            f"{folder}: fusing seeds {seeds[0]} and {seeds[1]}" + (f" (widths {widths[0]}, {widths[1]})" if mixed else "") + f" ({method})",
            flush=True,
        )
        name = f"seeds{seeds[0]}-{seeds[1]}" if not mixed else f"w{widths[0]}s{seeds[0]}-w{widths[1]}s{seeds[1]}"
        parts = [_part(m) for _, m in pair]
        name += ("-" + "+".join(parts) if any(parts) else "") + ("" if cfg.fusion_data == "union" else f"-{cfg.fusion_data}")
        fused_path, parents = folder / f"fused-{method}-{name}.pt", [p for p, _ in pair]
        tuned_paths = {f"the fine-tuned checkpoint {n}": n for n in _finetuned_paths(fused_path, args.finetune_epochs, finetunes)}
        tuned_paths |= {f"its per-epoch log {n.with_suffix('.csv')}": n.with_suffix(".csv") for n in tuned_paths.values()}

        def own(path: Path, parents=parents, fused_path=fused_path) -> bool:
            """This script's own earlier outputs for these parents, known by their metadata, never by their names."""
            if path == fused_path:
                return fused_from(path, parents)
            checkpoint = path.with_suffix(".pt")
            return finetuned_from(checkpoint, fused_path) and (path == checkpoint or is_log_of(path, checkpoint))

        # before the fusion: a refusal must not cost one
        check_outputs({"the fused checkpoint": fused_path, **tuned_paths}, {f"parent {p}": str(p) for p in parents}, own=own)
        fusion, acc = fusion_table(
            inputs.models,
            inputs.data,
            cfg,
            progress=True,
            target=inputs.target,
            with_baselines=args.baselines,
            tasks=inputs.tasks,
            class_counts=inputs.class_counts,
        )
        meta = fused_meta(inputs.metas, parents, width, flatten(cfg), acc["fused"])
        save_checkpoint(fused_path, fusion.fused, meta)
        seconds = dict(fusion.seconds)
        tuned = {}
        for column, suffix, extra in finetunes:
            t0 = time.perf_counter()
            out = finetune(
                fused_path,
                _finetuned_path(fused_path, args.finetune_epochs, suffix),
                args.data_dir,
                args.device,
                epochs=args.finetune_epochs,
                overwrite=True,
                precision=cfg.precision,
                progress=True,
                **extra,
                **_teachers(extra, parents),
            )
            tuned[("fused", column)] = out
            acc[column] = float(load_checkpoint(out)[1]["test_acc"])
            seconds[column.replace("fused_ft", "finetune")] = time.perf_counter() - t0
        if finetunes:
            key = {
                "dataset": ds,
                "arch": meta0["arch"],
                "width": width,
                "widths": "-".join(str(w) for w in widths),
                "seeds": f"{seeds[0]}-{seeds[1]}",
                "method": method,
            }
            curves = finetune_curves(fusion, inputs, parents, tuned, finetunes, args, key)
            write_curves(
                results,
                ds,
                curves,
                f"{ds}, {meta0['arch']} w{width}, seeds {seeds[0]}-{seeds[1]} ({method}): "
                f"{args.finetune_epochs} fine-tuning epochs from each start",
            )
        row = fusion_row(ds, {**meta0, "width": width}, seeds, method, acc, seconds, flatten(cfg))
        row["widths"] = "-".join(str(w) for w in widths)
        if args.finetune_epochs > 0:
            row["finetune_epochs"] = args.finetune_epochs
        if args.merge_until:
            key = {**{k: row[k] for k in (*KEY, "method")}, "parts": "+".join(parts), "fusion_data": cfg.fusion_data}
            write_partial(
                results,
                ds,
                key,
                acc,
                partial_rows(
                    fusion,
                    chosen_cuts(fusion.fused, args.merge_until),
                    inputs.data.train_x,
                    *inputs.data.split("test"),
                    inputs.data.norm,
                    inputs.tasks,
                    progress=True,
                ),
                f"{ds}, {meta0['arch']} w{width}, seeds {seeds[0]}-{seeds[1]}" + (f" ({'+'.join(parts)})" if any(parts) else ""),
            )
        if inputs.tasks:  # parties: their own table, joint and per-task accuracies
            upsert_row(results / f"split-{ds}.csv", split_row(row, parts, cfg.fusion_data, acc), SPLIT_KEY)
        else:
            upsert_row(results / f"{ds}_{method}.csv", row)
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)
    print(write_summary(results).read_text())
    return 0
