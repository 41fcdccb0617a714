"""Figures written as PNG files: interpolation curves, methods side by side, fine-tuning curves, partial merges' cost and a
tuning study's history.

    save_figure(interpolation_figure(rows, title), "results/interp.png")

matplotlib is imported when a figure is drawn, not with the package: most commands draw none.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from otfuse.storage import atomic_write_bytes

SOFTWARE = "otfuse"  # the PNG's Software text: what tells otfuse's own figures, which a later run may replace, from anyone's

CURVE_STYLE = {  # curve -> (colour, marker, legend label)
    "vanilla": ("tab:gray", "o", "vanilla average + BN reset"),
    "aligned": ("tab:blue", "s", "OT-aligned + BN reset"),
    "aligned+repair": ("tab:green", "^", "OT-aligned + REPAIR"),
}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend: plots are written, never shown."""
    import matplotlib  # optional at import time: a heavy import that only plotting commands need

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": SOFTWARE})  # legends outside the axes stay in
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def is_own_figure(path: str | Path) -> bool:
    """Whether the file at `path` is a PNG figure otfuse drew (its Software text), which a later run may replace."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.text.get("Software") == SOFTWARE
    except (OSError, ValueError, SyntaxError):  # not an image, unreadable, or a damaged PNG
        return False


def _finished(fig, ax, ylabel: str, title: str):
    """`fig` with the look every figure here shares: its y label and title, a light grid, the legend, tight margins."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def interpolation_figure(rows: list[dict], title: str, split: str = "test"):
    """Accuracy and loss against alpha, one line per curve."""
    fig, (ax_acc, ax_loss) = pyplot().subplots(1, 2, figsize=(10, 4), dpi=120)
    for curve, (colour, marker, label) in CURVE_STYLE.items():
        pts = [r for r in rows if r["curve"] == curve]
        if not pts:
            continue
        al = [r["alpha"] for r in pts]
        ax_acc.plot(al, [r["accuracy"] for r in pts], color=colour, marker=marker, ms=4, label=label)
        ax_loss.plot(al, [r["loss"] for r in pts], color=colour, marker=marker, ms=4, label=label)
    for ax, what in ((ax_acc, f"{split} accuracy (%)"), (ax_loss, f"{split} loss (cross-entropy)")):
        ax.set_xlabel("alpha: weight of model B  (0 = model A, 1 = model B)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def methods_figure(panels: list[tuple[str, dict[str, float], dict[str, float]]], title: str):
    """One bar chart per panel (title, {method: accuracy}, {reference: accuracy}): the methods as horizontal bars, the last
    drawn strongest, and the references (the parents' mean, the ensemble) as vertical lines."""
    fig, axes = pyplot().subplots(1, len(panels), figsize=(5.2 * len(panels), 3.9), dpi=120, squeeze=False)
    for ax, (name, bars, lines) in zip(axes[0], panels):
        labels = list(bars)
        colours = ["tab:gray"] * (len(labels) - 1) + ["tab:blue"]
        ax.barh(range(len(labels)), list(bars.values()), color=colours)
        for i, value in enumerate(bars.values()):
            inside = value > 15  # a short bar's figure goes beside it
            ax.text(
                value + (-1 if inside else 1),
                i,
                f"{value:.2f}",
                va="center",
                ha="right" if inside else "left",
                color="white" if inside else "black",
                fontsize=8,
                weight="bold",
            )
        for j, (label, value) in enumerate(lines.items()):
            ax.axvline(value, color=f"C{j + 1}", ls="--" if j else "-", lw=1.3, label=f"{label}: {value:.2f}")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def finetune_figure(rows: list[dict], title: str):
    """Validation accuracy after each fine-tuning epoch (0: the start), one line per start and recipe, and the
    parents' ensemble as a horizontal line. `rows`: results/finetune-<dataset>.csv's rows of one fusion."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=120)
    val = [r for r in rows if r["split"] == "val"]
    starts = list(dict.fromkeys(r["start"] for r in val if r["start"] != "ensemble"))
    for start, recipe in dict.fromkeys((r["start"], r["recipe"]) for r in val if r["start"] != "ensemble"):
        pts = sorted((int(r["epoch"]), float(r["acc"])) for r in val if (r["start"], r["recipe"]) == (start, recipe))
        # one colour per start, one line style per recipe
        ax.plot(
            *zip(*pts),
            "--" if recipe == "distill" else "-",
            color=f"C{starts.index(start)}",
            marker="o",
            ms=4,
            lw=2.2 if start == "fused" else 1.2,
            label=f"{start}, {recipe} recipe",
        )
    for r in val:
        if r["start"] == "ensemble":
            ax.axhline(float(r["acc"]), color="black", ls=":", lw=1, label="ensemble of the parents")
    ax.set_xlabel("fine-tuning epochs (0: the start)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _finished(fig, ax, "validation accuracy (%)", title)


def partial_figure(rows: list[dict], lines: dict[str, float], title: str):
    """Joint accuracy against FLOPs (as multiples of one parent's), one point per cut of a partial merge, named; the
    models in `lines` (e.g. each parent, their ensemble) as horizontal lines."""
    points = [(float(r["flops_x"]), float(r["accuracy"]), r["cut"]) for r in rows]
    return frontier_figure({"merged up to the cut, then one branch per parent": points}, lines, title)


def frontier_figure(series: dict[str, list[tuple[float, float, str]]], lines: dict[str, float], title: str):
    """Accuracy against compute (as multiples of one parent's): one line per series of (cost, accuracy, name) points,
    each point named (e.g. budgets and the depth cuts of a partial merge); the models in `lines` as horizontal lines."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=120)
    for i, (label, points) in enumerate(series.items()):
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", marker="o", ms=4, label=label)
        right = i % 2 == 0  # two series' names on opposite sides of their points, so that near points stay legible
        for fx_, acc, name in pts:
            xy = (4, -10) if right else (-5, 2)
            ax.annotate(name, (fx_, acc), textcoords="offset points", xytext=xy, ha="left" if right else "right", fontsize=7, color=f"C{i}")
    for i, (label, value) in enumerate(lines.items()):
        ax.axhline(value, color=f"C{i + len(series)}", ls=":", lw=1, label=label)
    ax.set_xlabel("FLOPs per image, as multiples of one parent's")
    return _finished(fig, ax, "joint test accuracy (%, every class)", title)


def many_figure(rows: list[dict], title: str):
    """Accuracy against the number of models fused (bench_many.py's rows): the fused model, the ensemble of the same
    models, their mean and best parent, and vanilla averaging + refit."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=120)
    rows = sorted(rows, key=lambda r: int(r["k"]))
    k = [int(r["k"]) for r in rows]
    for column, style, label in (
        ("ensemble", "k--", "ensemble of the same models"),
        ("parent_best", "C2:", "best parent"),
        ("parent_mean", "C2-", "parents' mean"),
        ("fused", "C0-", "fused into one model"),
        ("vanilla_refit", "C7-", "vanilla average + refit"),
    ):
        ax.plot(k, [float(r[column]) for r in rows], style, marker="o", ms=4, lw=2.2 if column == "fused" else 1.2, label=label)
    ax.set_xlabel("models fused")
    ax.xaxis.get_major_locator().set_params(integer=True)
    return _finished(fig, ax, "accuracy (%)", title)


def parties_figure(rows: list[dict], title: str, labels: dict[str, str] | None = None):
    """Test accuracy against the number of parties K (bench_parties.py's rows, one setting per K): the best party, the
    parties' ensemble and their per-class ensemble (where measured), one-round FedAvg (vanilla average + BatchNorm)
    and each fusion variant in the rows (named in the legend by `labels`, where given)."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=120)
    by_k: dict[int, dict] = {}
    for r in rows:  # the baselines of a row with the plain average measured, else of the K's first row
        if int(r["parties"]) not in by_k or (r.get("vanilla_bn") and not by_k[int(r["parties"])].get("vanilla_bn")):
            by_k[int(r["parties"])] = r
    ks = sorted(by_k)
    for column, style, label in (
        ("ensemble", "k--", "ensemble of the K parties"),
        ("ensemble_counts", "k:", "per-class ensemble (each party by its share of the class)"),
        ("best_party", "C2:", "best party"),
        ("vanilla_bn", "C7-", "plain average + BatchNorm (FedAvg, one round)"),
    ):
        found = {k: next((r for r in (by_k[k], *rows) if int(r["parties"]) == k and r.get(column)), None) for k in ks}
        pts = [(k, float(r[column])) for k, r in found.items() if r]
        if pts:
            ax.plot([k for k, _ in pts], [a for _, a in pts], style, marker="o", ms=4, lw=1.2, label=label)
    colours = ("C0", "C1", "C3", "C4", "C5", "C6", "C8", "C9")  # not the baselines' C2 and C7
    for i, variant in enumerate(dict.fromkeys(r["variant"] for r in rows)):
        pts = sorted((int(r["parties"]), float(r["fused"])) for r in rows if r["variant"] == variant)
        style = colours[i % len(colours)] + "-"
        name = (labels or {}).get(variant, variant)
        ax.plot([k for k, _ in pts], [a for _, a in pts], style, marker="o", ms=4, lw=2.2, label=f"fused ({name})")
    ax.set_xlabel("parties K")
    ax.set_xticks(ks)
    return _finished(fig, ax, "test accuracy (%, every class)", title)


@dataclass(frozen=True)
class Look:
    """How one run of the rounds figure is drawn (the bench picks it from the run's settings)."""

    color: str
    line: str = "-"
    main: bool = False  # drawn bold
    band: bool = False  # its clients' own models as a band under it
    faint: bool = False
    one_shot: bool = False  # sent once after all its local epochs: a star at the last round
    note: str = ""  # said after its name in the legend


def federated_figure(rows: list[dict], title: str, looks: dict[str, Look] | None = None):
    """Test accuracy against federated rounds (bench_federated.py's rows), one panel per Dirichlet alpha: a line per
    run as `looks` says (a run it does not name: grey), a one-shot run as a star at the last round, the clients' own
    models as a band (worst to best) where its look asks."""
    looks = looks or {}
    alphas = sorted({float(r["alpha"]) for r in rows}, reverse=True)
    last_round = max(int(r["round"]) for r in rows)
    fig, axes = pyplot().subplots(1, len(alphas), figsize=(6 * len(alphas), 4.2), dpi=120, squeeze=False, sharey=True)
    for ax, alpha in zip(axes[0], alphas):
        mine = [r for r in rows if float(r["alpha"]) == alpha]
        for run in dict.fromkeys(r["run"] for r in mine):
            points = sorted(((int(r["round"]), float(r["test_acc"]), r) for r in mine if r["run"] == run), key=lambda p: p[0])
            look = looks.get(run, Look("C7"))
            if look.one_shot:
                label = f"{run} ({look.note})" if look.note else run
                ax.plot([last_round], [points[-1][1]], marker="*", ms=12, color=look.color, ls="none", label=label)
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            lw, alpha_ = (2.2 if look.main else 1.2), (0.6 if look.faint else 1.0)
            ax.plot(xs, ys, color=look.color, ls=look.line, marker="o", ms=3.5, lw=lw, alpha=alpha_, label=run)
            band = [(x, float(r["worst_client_acc"]), float(r["best_client_acc"])) for x, _, r in points if r.get("worst_client_acc")]
            if look.band and band:
                xs, lo, hi = zip(*band)
                ax.fill_between(xs, lo, hi, color=look.color, alpha=0.12, label="its clients' own models (worst to best)")
        ax.set_title(f"Dirichlet alpha {alpha:g}", fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")  # where it hides fewest points: the runs that collapse end low on the right
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def history_figure(trials: list[tuple[int, str, float]], what: str):
    """Validation accuracy of every trial (number, method, value), by method, and the best so far."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=120)
    trials = sorted(trials)
    for method in dict.fromkeys(m for _, m, _ in trials):
        pts = [(n, v) for n, m, v in trials if m == method]
        ax.scatter(*zip(*pts), s=18, label=method, alpha=0.8)
    best, run = [], float("-inf")
    for _, _, v in trials:
        run = max(run, v)
        best.append(run)
    ax.step([n for n, _, _ in trials], best, where="post", color="black", lw=1.2, label="best so far")
    ax.set_xlabel("trial")
    return _finished(fig, ax, "fused validation accuracy (%)", f"otfuse tune: {what}")
