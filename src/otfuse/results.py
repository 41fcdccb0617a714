"""Results tables: one CSV per dataset and method, rows upserted atomically, and results/summary.md.

    upsert_row(Path("results/cifar10_activation.csv"), fusion_row(...))
    write_summary(Path("results"))

summary.md lays the means over fused pairs out like the original repository's table, with the
ensemble and vanilla averaging beside them. Its method columns come from the method registry
(`otfuse.align.METHODS`), followed by any other method found in the CSVs, so no run vanishes.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

from otfuse.align import METHODS
from otfuse.data import ImageData
from otfuse.errors import OtfuseError
from otfuse.report import COLUMNS
from otfuse.storage import atomic_write_csv, atomic_write_text

KEY = ("dataset", "arch", "width", "widths", "seeds")  # width: the fused model's; widths: its parents'
SPLIT_KEY = (*KEY, "parts", "method", "fusion_data")  # results/split-<dataset>.csv: parties, by their parts and fusion data
# the split table's models: (CSV column, header); "permute" is the aligned average with BatchNorm recomputed
SPLIT_COLUMNS = (
    ("model1", "Model 1"),
    ("model2", "Model 2"),
    ("ensemble", "Ensemble"),
    ("vanilla_bn", "Vanilla + BN"),
    ("vanilla_refit", "Vanilla + refit"),
    ("fused_average", "Permute"),
    ("fused_repair", "+ REPAIR"),
    ("fused", "Fused"),
)

PHASES = (
    *("groups", "alignment", "averaging", "batchnorm", "repair", "refit", "distill"),
    *("baselines", "evaluation", "finetune", "finetune_distill"),
)


def bench_stem(meta: dict, data: ImageData) -> str:
    """The name a bench's CSV carries for checkpoints with metadata `meta` on `data`: `<dataset>[-<arch>]-w<width>` (the
    data's own name where its content is known, e.g. cifar100; no arch for resnet18, whose files were named before there
    were others)."""
    arch = "" if meta["arch"] == "resnet18" else f"-{meta['arch'].replace(':', '-')}"
    return f"{data.slug.removeprefix('imagefolder-')}{arch}-w{meta['width']}"


def read_rows(path: Path) -> list[dict]:
    """The rows of the CSV at `path` ([] where there is none); one clear error for a file that is not a UTF-8 CSV."""
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise OtfuseError(f"{path} is not a CSV otfuse writes ({type(exc).__name__}); move it away or delete it") from None


def _rows_with(paths: list[Path], columns: set[str]) -> list[dict]:
    """The rows of the CSVs at `paths` that hold `columns`: a summary reads what the fusion scripts wrote and skips,
    with a warning, a file of someone else's (another encoding, other columns) that shares the folder and the name."""
    out = []
    for path in paths:
        try:
            rows = read_rows(path)
        except OtfuseError as exc:
            warnings.warn(f"the summary skips {exc}", stacklevel=2)
            continue
        out += [r for r in rows if columns <= r.keys()]
    return out


def _number(v: object) -> float:
    """A CSV cell as a number (NaN where it holds none)."""
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def upsert_row(path: Path, row: dict, key_columns: tuple[str, ...] = KEY) -> None:
    """Replace the row with the same `key_columns` (or append), rewriting the file atomically."""
    upsert_rows(path, [row], key_columns)


def upsert_rows(path: Path, new: list[dict], key_columns: tuple[str, ...] = KEY, fields: list[str] | tuple = ()) -> None:
    """Replace the rows with the same `key_columns` as `new` ones (or append), in one atomic rewrite; the columns in
    the order of `fields`, then any others as they come."""
    key = lambda r: tuple("" if r.get(k) is None else str(r.get(k)) for k in key_columns)  # 0 is a key, not a blank
    replaced = {key(r) for r in new}
    rows = [r for r in read_rows(path) if key(r) not in replaced] + [{k: str(v) for k, v in r.items()} for r in new]
    atomic_write_csv(path, rows, list(dict.fromkeys([*fields, *(c for r in rows for c in r)])))


def fusion_row(dataset: str, meta: dict, seeds: list, method: str, acc: dict, seconds: dict, options: dict) -> dict:
    """One CSV row: what was fused, every accuracy column, seconds per phase, and the options."""
    row = {"dataset": dataset, "arch": meta["arch"], "width": meta["width"], "seeds": "-".join(str(s) for s in seeds), "method": method}
    row.update({k: f"{acc[k]:.2f}" for k in (*COLUMNS, "fused_ft", "fused_ft_distill") if k in acc})
    row.update({f"s_{p}": f"{seconds.get(p, 0.0):.2f}" for p in PHASES})
    row["options"] = json.dumps(options, sort_keys=True)
    return row


def split_row(row: dict, parts: list[str], fusion_data: str, acc: dict[str, float]) -> dict:
    """A results/split-<dataset>.csv row: `row` (fusion_row's) with the parents' parts, the fusion data, and every
    joint and per-task accuracy."""
    return {
        **{k: v for k, v in row.items() if k != "options"},
        "parts": "+".join(parts),
        "fusion_data": fusion_data,
        **{k: f"{v:.2f}" for k, v in acc.items()},
        "options": row["options"],
    }


def split_summary(results_dir: Path) -> list[str]:
    """summary.md's table of parties' fusions: joint accuracy (every class) of each model, the fused model's per-task
    accuracies and its share of the ensemble's joint accuracy; means over the pairs fused."""
    rows = _rows_with(sorted(results_dir.glob("split-*.csv")), {"dataset", "arch", "width", "parts", "fusion_data", "method"})
    if not rows:
        return []
    head = [
        "Dataset",
        "Model",
        "Parts",
        "Fusion data",
        "Method",
        "Pairs",
        *[h for _, h in SPLIT_COLUMNS],
        "Fused per task",
        "Fused / ensemble",
    ]
    lines = [
        "",
        "## Parents trained on parts of the data",
        "",
        "Joint test accuracy (%, every class), mean over the fused pairs; per task: each parent's classes' images, "
        "argmax within them. Permute: the aligned average with BatchNorm recomputed.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["arch"], r["width"], r["parts"], r["fusion_data"], r["method"]), []).append(r)
    mean = lambda rs, k: sum(_number(r[k]) for r in rs) / len(rs) if all(r.get(k) for r in rs) else float("nan")
    for (dataset, arch, width, parts, data, method), rs in sorted(groups.items()):
        cells = [dataset, f"{arch} w{width}", parts, data, method, str(len(rs))]
        cells += [f"{mean(rs, k):.2f}" for k, _ in SPLIT_COLUMNS]
        tasks = sorted({k for r in rs for k in r if k.startswith("fused_task")})
        cells.append(" / ".join(f"{mean(rs, k):.2f}" for k in tasks))
        cells.append(f"{100 * mean(rs, 'fused') / mean(rs, 'ensemble'):.0f}%")
        lines.append("| " + " | ".join(c.replace("nan", "-") for c in cells) + " |")
    return lines


def _title(method: str) -> str:
    return METHODS[method].title if method in METHODS else method


def _short(method: str) -> str:
    return _title(method).removesuffix(" Fusion").removesuffix("-base")


SUMMARY_MARK = "<!-- otfuse: the fusion scripts write this file from the CSVs beside it, anew on every run -->"


def is_own_summary(path: Path) -> bool:
    """Whether `path` is a summary.md the fusion scripts wrote (marked; or, from before the mark, their title and
    first sentence), which the next run replaces; a file of the user's at that name is not."""
    try:
        head = path.read_text(encoding="utf-8").splitlines()[:5]
    except (OSError, UnicodeDecodeError):
        return False
    if head[:1] == [SUMMARY_MARK]:
        return True
    return head[:1] == ["# Fusion results"] and any(line.startswith("Test accuracy (%), mean over the fused pairs.") for line in head)


def write_summary(results_dir: Path) -> Path:
    """results/summary.md: per dataset and model, mean accuracies over pairs for every method run."""
    by_model: dict[tuple, dict[str, list[dict]]] = {}
    for r in _rows_with(sorted(results_dir.glob("*_*.csv")), {"dataset", "arch", "width", "fused", "method"}):
        if "parts" not in r:
            by_model.setdefault((r["dataset"], r["arch"], r["width"], r.get("widths") or ""), {}).setdefault(r["method"], []).append(r)
    found = {m for v in by_model.values() for m in v}
    methods = [m for m in METHODS if m in found] + sorted(found - set(METHODS))
    rows_of = lambda m: [r for v in by_model.values() for r in v.get(m, [])]
    # (header, method, CSV column): the stage columns appear once some run has them
    cols = [(_title(m), m, "fused") for m in methods]
    cols += [(f"{_short(m)}, average only", m, "fused_average") for m in methods if any(r.get("fused_average") for r in rows_of(m))]
    cols += [(f"{_short(m)} + REPAIR", m, "fused_repair") for m in methods if any(r.get("fused_repair") for r in rows_of(m))]
    epochs = sorted({r.get("finetune_epochs") for m in methods for r in rows_of(m) if r.get("fused_ft")})
    cols += [
        (f"{_short(m)} + {'/'.join(epochs)} ep fine-tuning", m, "fused_ft") for m in methods if any(r.get("fused_ft") for r in rows_of(m))
    ]
    cols += [
        (f"{_short(m)} + {'/'.join(epochs)} ep distillation", m, "fused_ft_distill")
        for m in methods
        if any(r.get("fused_ft_distill") for r in rows_of(m))
    ]
    refit_col = [("Vanilla + refit", "vanilla_refit")] if any(r.get("vanilla_refit") for m in methods for r in rows_of(m)) else []
    head = ["Dataset", "Model", "Pairs", "Model1", "Model2"] + [c[0] for c in cols] + ["Ensemble", "Vanilla", "Vanilla + BN"]
    head += [h for h, _ in refit_col]
    lines = [
        SUMMARY_MARK,
        "# Fusion results",
        "",
        "Test accuracy (%), mean over the fused pairs. A method's own column is the fusion with the options "
        "it ran with (by default: aligned average, BatchNorm recomputed, then the layer-wise refit); "
        '"average only" is the aligned average with BatchNorm recomputed; "+ REPAIR" is that with REPAIR '
        "instead of the refit. No fine-tuning except in the fine-tuning columns.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    mean = lambda rows, k: f"{sum(_number(r[k]) for r in rows) / len(rows):.2f}" if rows and all(r.get(k) for r in rows) else "-"
    for (dataset, arch, width, widths), runs in sorted(by_model.items()):
        any_rows = next(iter(runs.values()))
        parents = widths.split("-") if widths else [width]
        label = f"{arch} w{width}" if set(parents) == {width} else f"{arch} {'+'.join('w' + w for w in parents)} -> w{width}"
        cells = [dataset, label, str(len(any_rows)), mean(any_rows, "model1"), mean(any_rows, "model2")]
        cells += [mean(runs.get(m, []), k) for _, m, k in cols]
        cells += [mean(any_rows, "ensemble"), mean(any_rows, "vanilla"), mean(any_rows, "vanilla_bn")]
        cells += [mean(any_rows, k) for _, k in refit_col]
        lines.append("| " + " | ".join(cells) + " |")
    lines += split_summary(results_dir)
    path = results_dir / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
