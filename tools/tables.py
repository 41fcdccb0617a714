#!/usr/bin/env python
"""Every results table in README.md and docs/, rendered from the committed CSV it reports.

    python tools/tables.py           # rewrite every marked table from its CSV
    python tools/tables.py --check   # exit 1 naming each table that differs from its CSV (tests/test_docs.py runs it)

A table is marked by the line above it, `<!-- table: NAME -->`, NAME a key of TABLES: which CSV rows it
shows and how. The table is the run of lines starting with `|` right after the marker. A figure changes in
the CSV (a bench writes it), then here, never by hand in the Markdown.
"""

from __future__ import annotations

import csv
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PAGES = ("README.md", "docs/*.md")
MARKER = re.compile(r"^<!-- table: ([\w-]+) -->$")

TABLES: dict[str, Callable[[], list[list[str]]]] = {}


def table(fn: Callable[[], list[list[str]]]) -> Callable[[], list[list[str]]]:
    """Register a table under its function's name (underscores as hyphens): it returns the header row, then the rows."""
    TABLES[fn.__name__.replace("_", "-")] = fn
    return fn


def rows(csv_name: str, **where: str) -> list[dict[str, str]]:
    with open(BENCH / csv_name, newline="") as f:
        found = [r for r in csv.DictReader(f) if all(r.get(k) == v for k, v in where.items())]
    if not found:
        raise SystemExit(f"tools/tables.py: bench/{csv_name} has no row with {where}")
    return found


def one(csv_name: str, **where: str) -> dict[str, str]:
    found = rows(csv_name, **where)
    if len(found) != 1:
        raise SystemExit(f"tools/tables.py: bench/{csv_name} has {len(found)} rows with {where}, the table shows one")
    return found[0]


def dash(value: str | None) -> str:
    return value if value else "-"


def pair(row: dict, a: str = "agree_model1", b: str = "agree_model2") -> str:
    return f"{row[a]} / {row[b]}"


def drop(row: dict) -> str:
    """The fused accuracy against the parents' mean, in points."""
    return f"{float(row['fused']) - (float(row['model1']) + float(row['model2'])) / 2:.2f}"


def one_pair_knobs(what: str, csv_name: str) -> list[list[str]]:
    """bench_knobs.py's rows: each change from the defaults, its validation accuracy, agreement and seconds."""
    return [
        [f"Change from the defaults ({what})", "val", "agrees with A / B", "seconds"],
        *[[r["change"].replace(",", ", "), r["val_accuracy"], pair(r), r["seconds"]] for r in rows(csv_name)],
    ]


def markdown(table_rows: list[list[str]]) -> list[str]:
    header, *body = table_rows
    line = lambda cells: "| " + " | ".join(cells) + " |"
    return [line(header), "|" + "---|" * len(header), *map(line, body)]


# --- README ----------------------------------------------------------------------------------------------------------

W64 = {"row": "default", "precision": "fp32", "split": "test"}  # bench_scale.py's default fusion of the shared pair


C100 = {"row": "default", "precision": "bf16", "split": "test"}  # bench_scale.py's default fusion of the CIFAR-100 pair, as fused here


@table
def headline() -> list[list[str]]:
    """Ours (the default fusion and its weight-based row) beside the original repository's rows."""
    out = [["", "Model 1", "Model 2", "Ensemble", "Aligned average + BN (the original's method)", "**Fused**", "against the parents' mean"]]
    for label, name, where in (
        ("otfuse, CIFAR-10 JPEG copy, width 64", "scale-cifar10-jpeg-w64.csv", W64),
        ("otfuse, CIFAR-100, width 32 (15 epochs)", "scale-cifar100-w32.csv", C100),
    ):
        r = one(name, **where)
        out.append([label, r["model1"], r["model2"], r["ensemble"], r["fused_average"], f"**{r['fused']}**", drop(r)])
    c100 = one("scale-cifar100-w32.csv", **{**C100, "row": "weight"})
    base = one("scale-cifar100-w32.csv", **C100)
    out.append(
        [
            "otfuse, CIFAR-100, width 32, weight-based",
            base["model1"],
            base["model2"],
            "-",
            c100["fused_average"],
            f"**{c100['fused']}**",
            drop({**c100, "model1": base["model1"], "model2": base["model2"]}),
        ]
    )
    for r in rows("original-repository.csv"):  # the original's fusion is the aligned average with BatchNorm recomputed
        out.append(
            [
                f"original repository, {r['method']}-based, {r['dataset']} (width 64)",
                r["model1"],
                r["model2"],
                "-",
                r["fused"],
                "-",
                drop(r),
            ]
        )
    return out


VIT = "fashion-mnist-vit-w64"


@table
def vit() -> list[list[str]]:
    """The registry's ViT on Fashion-MNIST: the default fusion beside every baseline, then one epoch for each start."""
    r = one(f"scale-{VIT}.csv", row="default")
    ft = {x["start"]: x["acc"] for x in rows(f"finetune-{VIT}.csv", split="test")}
    mean = (float(r["model1"]) + float(r["model2"])) / 2
    return [
        ["", "Model 1", "Model 2", "Ensemble", "Vanilla + refit", "Average only", "+ REPAIR", "**Fused**", "against the parents' mean"],
        [
            "gradient-free",
            r["model1"],
            r["model2"],
            r["ensemble"],
            r["vanilla_refit"],
            r["fused_average"],
            r["fused_repair"],
            f"**{r['fused']}**",
            f"{float(r['fused']) - mean:+.2f}",
        ],
        [
            "each + 1 epoch (same recipe)",
            ft["seed0"],
            ft["seed1"],
            "-",
            ft["vanilla"],
            "-",
            "-",
            f"**{ft['fused']}**",
            f"{float(ft['fused']) - mean:+.2f}",
        ],
    ]


@table
def vit_knobs() -> list[list[str]]:
    return one_pair_knobs("ViT, Fashion-MNIST", f"knobs-{VIT}.csv")


# --- docs/measurements.md --------------------------------------------------------------------------------------------


@table
def width16() -> list[list[str]]:
    out = [
        [
            "Dataset",
            "Model1",
            "Model2",
            "Activation",
            "average only",
            "+ REPAIR",
            "+ 1 epoch",
            "Weight",
            "Weight matching",
            "Ensemble",
            "Vanilla + BN",
            "Vanilla + refit",
        ]
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in rows("fusions-w16.csv")):
        act, weight, matching = (one("fusions-w16.csv", dataset=dataset, method=m) for m in ("activation", "weight", "weight-matching"))
        out.append(
            [
                act["label"],
                act["model1"],
                act["model2"],
                f"**{act['fused']}**",
                act["fused_average"],
                act["fused_repair"],
                act["fused_ft"],
                weight["fused"],
                matching["fused"],
                act["ensemble"],
                act["vanilla_bn"],
                act["vanilla_refit"],
            ]
        )
    return out


def fusion_rows(*names: str) -> list[list[str]]:
    out = [["Model1", "Model2", "Ensemble", "Fused", "average only", "+ REPAIR", "Vanilla + BN", "Vanilla + refit", "agrees with A / B"]]
    for name in names:
        r = one("fusions.csv", name=name)
        out.append(
            [
                r["model1"],
                r["model2"],
                r["ensemble"],
                f"**{r['fused']}**",
                r["fused_average"],
                r["fused_repair"],
                r["vanilla_bn"],
                r["vanilla_refit"],
                pair(r),
            ]
        )
    return out


@table
def ghostnet() -> list[list[str]]:
    header, *body = fusion_rows("ghostnet")
    return [["Dataset", *header], *[[one("fusions.csv", name="ghostnet")["label"], *row] for row in body]]


@table
def width64() -> list[list[str]]:
    r = one("scale-cifar10-jpeg-w64.csv", **W64)
    mean = (float(r["model1"]) + float(r["model2"])) / 2
    return [
        ["Parents", "Ensemble", "Vanilla + BN", "Vanilla + refit", "average only", "+ REPAIR", "**Default fusion**", "agrees with A / B"],
        [
            f"{pair(r, 'model1', 'model2')} (mean {mean:.2f})",
            r["ensemble"],
            r["vanilla_bn"],
            r["vanilla_refit"],
            r["fused_average"],
            r["fused_repair"],
            f"**{r['fused']}**",
            pair(r),
        ],
    ]


@table
def width64_knobs() -> list[list[str]]:
    return [
        ["Fusion (validation split)", "val", "agrees with A / B"],
        *[[r["label"], r["val_accuracy"], pair(r)] for r in rows("knobs-cifar10-jpeg-w64.csv")],
    ]


@table
def cifar100() -> list[list[str]]:
    """The full fusion table of the CIFAR-100 pair: every baseline, then each method's fusion and average only."""
    r = one("scale-cifar100-w32.csv", **C100)
    mean = (float(r["model1"]) + float(r["model2"])) / 2
    out = [
        [
            "Parents",
            "Ensemble",
            "Vanilla",
            "Vanilla + BN",
            "Vanilla + refit",
            "Aligned average + BN",
            "+ REPAIR",
            "**Default fusion**",
            "agrees with A / B",
        ],
        [
            f"{pair(r, 'model1', 'model2')} (mean {mean:.2f})",
            r["ensemble"],
            r["vanilla"],
            r["vanilla_bn"],
            r["vanilla_refit"],
            r["fused_average"],
            r["fused_repair"],
            f"**{r['fused']}**",
            pair(r),
        ],
    ]
    return out


@table
def cifar100_methods() -> list[list[str]]:
    out = [["Method (CIFAR-100, test)", "Aligned average + BN", "Fused (+ refit)", "against the parents' mean", "agrees with A / B"]]
    base = one("scale-cifar100-w32.csv", **C100)
    for method in ("activation", "weight", "weight-matching"):
        r = one("scale-cifar100-w32.csv", **{**C100, "row": "default" if method == "activation" else method})
        out.append([method, r["fused_average"], r["fused"], drop({**r, "model1": base["model1"], "model2": base["model2"]}), pair(r)])
    return out


@table
def cifar100_knobs() -> list[list[str]]:
    return one_pair_knobs("CIFAR-100, width 32", "knobs-cifar100-w32.csv")


@table
def many_parents() -> list[list[str]]:
    out = [
        [
            "Models fused",
            "Seeds",
            "Parents",
            "Parents' mean",
            "Ensemble",
            "Vanilla + refit",
            "Aligned average + BN",
            "**Fused**",
            "against the mean",
            "against the ensemble",
        ]
    ]
    for r in rows("many-cifar100-w32.csv", split="test"):
        out.append(
            [
                r["k"],
                r["seeds"],
                r["parents"],
                r["parent_mean"],
                r["ensemble"],
                r["vanilla_refit"],
                r["fused_average"],
                f"**{r['fused']}**",
                r["fused_minus_mean"],
                r["fused_minus_ensemble"],
            ]
        )
    return out


@table
def parties() -> list[list[str]]:
    """bench/bench_parties.py: K parties of a Dirichlet partition fused, every variant, on each split measured."""
    out = [
        [
            "Setting",
            "Split",
            "Variant",
            "Best party",
            "Ensemble",
            "Per-class ensemble",
            "Vanilla + BN (FedAvg)",
            "Vanilla + refit",
            "Aligned average + BN",
            "**Fused**",
            "Fused / ensemble",
            "Fused / per-class ensemble",
            "Fused - best party",
            "Fusion seconds",
        ]
    ]
    for path in sorted(BENCH.glob("parties-*.csv")):
        for r in rows(path.name):
            out.append(
                [
                    r["setting"],
                    r["split"],
                    r["variant"],
                    r["best_party"],
                    r["ensemble"],
                    dash(r.get("ensemble_counts")),
                    dash(r.get("vanilla_bn")),
                    dash(r.get("vanilla_refit")),
                    dash(r.get("fused_average")),
                    f"**{r['fused']}**",
                    f"{r['fused_of_ensemble']}%",
                    f"{100 * float(r['fused']) / float(r['ensemble_counts']):.1f}%" if r.get("ensemble_counts") else "-",
                    r["fused_minus_best"],
                    r["seconds_fusion"],
                ]
            )
    return out


@table
def fuse_defaults() -> list[list[str]]:
    """Every fusion option with its default and meaning, from FuseConfig itself (the code, never a copy)."""
    from otfuse.fusion import FuseConfig
    from otfuse.options import options_of

    out = [["Option", "Default", "Meaning"]]
    for o in options_of(FuseConfig):
        default = f"`{o.default}`" if o.default != "" else "(empty)"
        out.append([f"`--{o.name.replace('_', '-')}`", default, o.help.replace("|", "/").replace("<", "&lt;") or "-"])
    return out


@table
def tune_space() -> list[list[str]]:
    """otfuse tune's search space, from tune.py's CHOICES and RANGES."""
    from otfuse import tune

    out = [["Option", "Searched over"]]
    out.append(["`method`", "`--methods` (default: every registered method)"])
    for name, choices in tune.CHOICES.items():
        out.append([f"`{name}`", ", ".join(str(c) for c in choices)])
    for name, (low, high, log) in tune.RANGES.items():
        out.append([f"`{name}`", f"{low:g} to {high:g}{', log scale' if log else ''}"])
    return out


@table
def federated() -> list[list[str]]:
    """bench/bench_federated.py: the server's test accuracy after each round, one row per run (every CSV)."""
    found = [r for path in sorted(BENCH.glob("federated-*.csv")) for r in rows(path.name)]
    width = max(int(r["round"]) for r in found)
    last_round = ["clients' own (last round)", "their ensemble", "seconds", "MB a round"]
    out = [["Run", "Clients", "alpha", *(f"round {i}" for i in range(1, width + 1)), *last_round]]
    for run in dict.fromkeys(r["run"] for r in found):
        mine = sorted((r for r in found if r["run"] == run), key=lambda r: int(r["round"]))
        last = mine[-1]
        out.append(
            [
                run,
                last["clients"],
                last["alpha"],
                *(next((r["test_acc"] for r in mine if int(r["round"]) == i), "") for i in range(1, width + 1)),
                f"{last['worst_client_acc']} - {last['best_client_acc']}",
                last.get("ensemble_acc") or "-",
                f"{sum(float(r['seconds']) for r in mine):.0f}",
                f"{int(last['bytes']) / 1e6:.1f}",
            ]
        )
    return out


@table
def budget_cifar100() -> list[list[str]]:
    """bench/bench_budget.py on the shared CIFAR-100 pair: each budget's channels kept apart, cost and accuracy, then
    each depth cut of --merge-until on the same pair, by cost."""
    out = [["Model", "Channels kept apart", "Multiply-accumulates (x one parent's)", "Test accuracy", "Ensemble"]]
    found = sorted(rows("budget-cifar100-w32.csv"), key=lambda r: (r["kind"] != "budget", float(r["flops_x"])))
    for r in found:
        name = f"--budget {r['point']}" if r["kind"] == "budget" else f"--merge-until {r['point']}"
        out.append([name, r["channels_apart"] or "", r["flops_x"], r["test_acc"], r["ensemble"]])
    return out


@table
def finetune_c100() -> list[list[str]]:
    found = rows("finetune-cifar100-w32.csv")
    out = [["Start", "Epochs (lr 0.05, no augmentation)", "val at start", "val after each epoch", "test at the end", "minutes"]]
    for start, options in dict.fromkeys((r["start"], r["options"]) for r in found):
        run = [r for r in found if (r["start"], r["options"]) == (start, options)]
        val = {int(r["epoch"]): r["acc"] for r in run if r["split"] == "val"}
        test = next(r for r in run if r["split"] == "test")
        out.append(
            [
                START_LABELS.get(start, f"{start} (parent)"),
                test["epochs"],
                dash(val.get(0)),
                ", ".join(val[e] for e in sorted(val) if e),
                f"**{test['acc']}**",
                f"{float(test['seconds']) / 60:.0f}",
            ]
        )
    return out


FINETUNE_CSV = "finetune-cifar10-jpeg-w64.csv"
START_LABELS = {
    "fused": "default fusion",
    "vanilla": "vanilla average + refit",
    "transplant": "transplant (both side by side, pruned back)",
    "fused-w32": "fused into width 32",
    "pruned-w32": "seed0 pruned to width 32",
    "scratch-w32": "width 32 from scratch",
    "fused-pruned-w32": "default fusion pruned to width 32",
    "transplant-w32": "transplant pruned to width 32",
}


@table
def finetune_w64() -> list[list[str]]:
    """One row per run of bench_finetune.py: its start, recipe, validation accuracy after each epoch, test at the end."""
    found = rows(FINETUNE_CSV)
    runs = list(dict.fromkeys((r["start"], r["options"]) for r in found))
    epochs = max(int(r["epoch"]) for r in found)
    first = min(int(r["epoch"]) for r in found)  # 0 where a run recorded its start
    out = [
        ["Start", "Recipe", *[f"val after {e}" if e else "val at start" for e in range(first, epochs + 1)], "test at the end", "minutes"]
    ]
    for start, options in runs:
        run = [r for r in found if (r["start"], r["options"]) == (start, options)]
        val = {int(r["epoch"]): r["acc"] for r in run if r["split"] == "val"}
        test = next(r for r in run if r["split"] == "test")
        recipe = ", ".join(options.split())
        out.append(
            [
                START_LABELS.get(start, f"{start} (parent)"),
                recipe,
                *[dash(val.get(e)) for e in range(first, epochs + 1)],
                f"**{test['acc']}**",
                f"{float(test['seconds']) / 60:.0f}",
            ]
        )
    return out


# --- docs/defaults.md ------------------------------------------------------------------------------------------------


def knobs(suffix: str, labels: dict[str, str]) -> list[list[str]]:
    fashion, cifar = (rows(f"knobs-{ds}-w16{suffix}.csv") for ds in ("fashion-mnist", "imagefolder-cifar10-jpeg"))
    by_change = {r["change"]: r for r in cifar}
    out = [["Change from the defaults", "Fashion-MNIST val", "agrees with A / B", "CIFAR-10 val", "agrees with A / B"]]
    for r in fashion:
        c = by_change.get(r["change"], {})
        out.append(
            [
                labels.get(r["change"], r["change"].replace(",", ", ")),
                r["val_accuracy"],
                pair(r),
                dash(c.get("val_accuracy")),
                pair(c) if c else "-",
            ]
        )
    return out


@table
def knobs_average() -> list[list[str]]:
    return knobs("-average", {})


@table
def knobs_refit() -> list[list[str]]:
    return knobs("", {"defaults": "defaults (refit, ridge 0.01)", "refit=False": "refit=False (the average)"})


@table
def finetune_settings() -> list[list[str]]:
    fashion, cifar = (rows(f"finetune-settings-{ds}-w16.csv") for ds in ("fashion-mnist", "imagefolder-cifar10-jpeg"))
    by_key = {(r["start"], r["change"]): r for r in cifar}
    out = [["Start, change", "Fashion-MNIST val", "CIFAR-10 val"]]
    for r in fashion:
        c = by_key.get((r["start"], r["change"]), {})
        change = "defaults (lr 0.05, no augmentation)" if r["change"] == "defaults" and r["start"] == "fused" else r["change"]
        out.append([f"{r['start']}, {change}", r["val_accuracy"], dash(c.get("val_accuracy"))])
    return out


# --- docs/widths.md, docs/architectures.md ---------------------------------------------------------------------------


@table
def widths() -> list[list[str]]:
    out = [["Parents (test)", "Fused into", "Fused, no gradient step", "average only", "+ 1 epoch", "Ensemble", "Seconds"]]
    for name in ("mixed-w16-w8", "same-w16", "w64-into-w32", "w64-into-w48"):
        r = one("fusions.csv", name=name)
        out.append([r["label"], r["target"], r["fused"], r["fused_average"], dash(r["fused_ft"]), r["ensemble"], r["seconds"]])
    return out


@table
def resnext18() -> list[list[str]]:
    return fusion_rows("resnext18")


def _seconds(v: float) -> str:
    return f"{v:.2g}" if v < 100 else f"{v:.0f}"


def zoo_row(label: str, found: list[dict], why: str = "") -> list[str]:
    exact = [r for r in found if r["result"] == "exact"]
    refused = [r["model"] for r in found if r["result"] != "exact"]
    if not refused:
        result = "exact"
    elif not exact:
        result = f"refused: {why}" if why else "refused"
    else:
        result = f"{len(exact)} exact; {', '.join(refused)} refused"
    error = f"{max(float(r['rel_error']) for r in exact):.1e}" if exact else "-"
    secs = sorted(float(r["total_s"]) for r in found)
    span = _seconds(secs[0]) if _seconds(secs[0]) == _seconds(secs[-1]) else f"{_seconds(secs[0])}-{_seconds(secs[-1])}"
    return [label, result, error, span]


# torchvision's families as the table groups them: (name: csv families), what they exercise, why a refusal
TORCHVISION = [
    ({"AlexNet": ["alexnet"], "VGG": ["vgg", "vgg11", "vgg13", "vgg16", "vgg19"], "SqueezeNet": ["squeezenet"]}, "", ""),
    ({"ResNet": ["resnet"], "Wide ResNet": ["wide"]}, "", ""),
    ({"ResNeXt": ["resnext50", "resnext101"]}, "grouped convs", ""),
    ({"RegNet X and Y": ["regnet"]}, "grouped convs, squeeze-excitation", ""),
    ({"ConvNeXt": ["convnext"]}, "layer scale, channels-last LayerNorm", ""),
    ({"DenseNet": ["densenet"]}, "concatenations", ""),
    ({"GoogLeNet": ["googlenet"], "Inception v3": ["inception"]}, "", ""),
    (
        {"MobileNet v2 and v3": ["mobilenet"], "MNASNet": ["mnasnet"], "EfficientNet v1 and v2": ["efficientnet"]},
        "depthwise convs, squeeze-excitation",
        "",
    ),
    ({"ShuffleNetV2": ["shufflenet"]}, "", "it shuffles channels"),
    ({"ViT": ["vit"]}, "`nn.MultiheadAttention`, heads as blocks", ""),
    ({"Swin v1 and v2": ["swin"]}, "window attention, a position bias table per head, patch merging", ""),
    ({"MaxViT": ["maxvit"]}, "window and grid attention, MBConv blocks", ""),
]


@table
def zoo_torchvision() -> list[list[str]]:
    every = rows("zoo-torchvision.csv")
    out = [["Family (models)", "Result", "Largest relative error", "Seconds each"]]
    for names, what, why in TORCHVISION:
        parts, found = [], []
        for name, families in names.items():
            members = [r for r in every if r["family"] in families]
            parts.append(name if len(members) == 1 else f"{name} ({len(members)})")
            found += members
        out.append(zoo_row(", ".join(parts) + (f": {what}" if what else ""), found, why))
    return out


def zoo_by_family(name: str, header: str, family: Callable[[dict], str] = lambda r: r["family"]) -> list[list[str]]:
    every = rows(name)
    out = [[header, "Result", "Largest relative error", "Seconds each"]]
    for label in sorted({family(r) for r in every}):
        found = [r for r in every if family(r) == label]
        out.append(zoo_row(f"{label} ({len(found)})", found))
    return out


@table
def zoo_timm() -> list[list[str]]:
    return zoo_by_family("zoo-timm.csv", "timm family (models)")


@table
def zoo_timm_transformers() -> list[list[str]]:
    return zoo_by_family("zoo-timm-transformers.csv", "timm transformer family (models)")


@table
def zoo_timm_mlp() -> list[list[str]]:
    # one timm module (mlp_mixer) holds all four designs: named by the model's prefix
    return zoo_by_family("zoo-timm-mlp.csv", "timm token-mixing MLP (models)", lambda r: r["model"].split("_")[0])


# --- docs/speed.md ---------------------------------------------------------------------------------------------------


@table
def speed_layouts() -> list[list[str]]:
    found = rows("speed-layouts-cpu2.csv")
    layouts = list(dict.fromkeys(r["layout"] for r in found))
    out = [["", *layouts]]
    for what in dict.fromkeys(r["what"] for r in found):
        out.append([what, *[one("speed-layouts-cpu2.csv", what=what, layout=layout)["img_s"] for layout in layouts]])
    return out


@table
def speed_targets() -> list[list[str]]:
    return [
        ["", "before", "bf16 (`auto` here)", "fp32"],
        *[[r["what"], r["before"], r["bf16"], r["fp32"]] for r in rows("speed-targets-cpu2.csv")],
    ]


# --- docs/splits.md: parents trained on different data ----------------------------------------------------------------

SPLITS = {  # bench_split.py's setting -> (its CSV, the label tables give it)
    "cifar100-50+50": ("split-cifar100-w32.csv", "CIFAR-100 50+50, width 32"),
    "cifar10-5+5": ("split-cifar10-jpeg-w16.csv", "CIFAR-10 (JPEG copy) 5+5, width 16"),
    "cifar10-biased": ("split-cifar10-jpeg-w16.csv", "CIFAR-10 (JPEG copy) biased 80/20, width 16"),
    "cifar100-biased": ("split-cifar100-w16.csv", "CIFAR-100 biased 80/20, width 16"),
}
FUSION_DATA = {"union": "both parties' images", "model1": "party A's images only"}


def split_rows(**where: str) -> list[tuple[str, dict[str, str]]]:
    """(label, row) of every measured setting, in SPLITS' order: a setting not run yet has no CSV or no row."""
    out = []
    for setting, (csv_name, label) in SPLITS.items():
        if (BENCH / csv_name).is_file():
            with open(BENCH / csv_name, newline="") as f:
                found = [r for r in csv.DictReader(f) if r["setting"] == setting and all(r.get(k) == v for k, v in where.items())]
            out += [(label, r) for r in found]
    return out


SPLIT_COLUMNS = {  # header -> the split CSV's column (or what a cell shows), in table order
    "Model A": "model1",
    "Model B": "model2",
    "Ensemble": "ensemble",
    "Vanilla + BN": "vanilla_bn",
    "Vanilla + refit": "vanilla_refit",
    "Permute": "fused_average",
    "+ REPAIR": "fused_repair",
    "**Fused**": lambda r: f"**{r['fused']}**",
    "fused / ensemble": lambda r: f"{r['fused_of_ensemble']}%",
    "fused per task (A / B)": lambda r: pair(r, "fused_task1", "fused_task2"),
}


def split_cells(r: dict[str, str], headers: list[str]) -> list[str]:
    return [c(r) if callable(c := SPLIT_COLUMNS[h]) else r[c] for h in headers]


def distilled(r: dict[str, str]) -> str:
    """The distillation a split row's fusion ran: none (rows from before the stage read 0), or its passes."""
    n = r.get("distill_epochs") or "0"
    return "" if n == "0" else f", distilled ({n} pass{'es' if n != '1' else ''})"


@table
def split() -> list[list[str]]:
    headers = list(SPLIT_COLUMNS)
    out = [["Setting (joint test accuracy)", "Method, fusion data", *headers]]
    for label, r in split_rows():
        out.append([label, f"{r['method']}, {FUSION_DATA[r['fusion_data']]}{distilled(r)}", *split_cells(r, headers)])
    return out


@table
def split_summary() -> list[list[str]]:
    """Each setting's fusion with the default options: refit only (as before the distillation stage), and the
    default now (refit, then one distillation pass: parties of different data), where it has been run; the parties
    and baselines of the latest run (parties trained again differ a little from the first run's)."""
    headers = ["Model A", "Model B", "Ensemble", "Permute"]
    out = [["Parties trained on different data (test, all classes)", *headers, "Refit only", "**Fused**", "fused / ensemble"]]
    rows = split_rows(method="activation", fusion_data="union")
    for label in dict.fromkeys(label for label, _ in rows):
        by = {r.get("distill_epochs") or "0": r for lab, r in rows if lab == label}
        now = by.get("1")
        last = [f"**{now['fused']}**", f"{now['fused_of_ensemble']}%"] if now else ["not run yet", "-"]
        out.append([label, *split_cells(now or by["0"], headers), by["0"]["fused"], *last])
    return out


@table
def partial_cifar100() -> list[list[str]]:
    out = [["Merged up to", "Parameters (x one model)", "FLOPs (x one model)", "Joint accuracy", "per task (A / B)"]]
    with open(ROOT / "results" / "partial-cifar100.csv", newline="") as f:
        for r in csv.DictReader(f):
            tasks = f"{float(r['accuracy_task1']):.2f} / {float(r['accuracy_task2']):.2f}"
            out.append([r["cut"], f"{float(r['params_x']):.2f}", f"{float(r['flops_x']):.2f}", f"{float(r['accuracy']):.2f}", tasks])
    return out


# --- rendering -------------------------------------------------------------------------------------------------------


def render(text: str, where: str) -> tuple[str, list[str]]:
    """(`text` with every marked table rendered, the names of the tables that changed)."""
    lines, out, changed, i = text.split("\n"), [], [], 0
    while i < len(lines):
        out.append(lines[i])
        m = MARKER.match(lines[i].strip())
        i += 1
        if not m:
            continue
        if m.group(1) not in TABLES:
            raise SystemExit(f"tools/tables.py: {where} marks a table {m.group(1)!r} it does not know; known: {', '.join(TABLES)}")
        old = []
        while i < len(lines) and lines[i].startswith("|"):
            old.append(lines[i])
            i += 1
        new = markdown(TABLES[m.group(1)]())
        changed += [m.group(1)] if new != old else []
        out += new
    return "\n".join(out), changed


def pages() -> list[Path]:
    return [p for pattern in PAGES for p in sorted(ROOT.glob(pattern))]


def stale() -> list[str]:
    """'page: table' for every marked table that differs from its CSV."""
    return [f"{p.relative_to(ROOT)}: {name}" for p in pages() for name in render(p.read_text(), str(p))[1]]


def marked() -> list[str]:
    return [m.group(1) for p in pages() for line in p.read_text().splitlines() if (m := MARKER.match(line.strip()))]


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        bad = stale()
        for b in bad:
            print(f"stale table {b}: run python tools/tables.py", file=sys.stderr)
        return 1 if bad else 0
    if argv:
        raise SystemExit(__doc__)
    for p in pages():
        text, changed = render(p.read_text(), str(p))
        if changed:
            p.write_text(text)
            print(f"{p.relative_to(ROOT)}: {', '.join(changed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
