"""Test accuracy and loss along the line between two models, without and with alignment.

    otfuse interpolate A.pt B.pt                     # results/interp-<dataset>-<arch>-w<width>-seeds<a>-<b>.{csv,png}
    otfuse interpolate A.pt B.pt --points 21 --method weight-matching

At each alpha the model (1 - alpha) * A + alpha * B' is evaluated, where B' is B itself
("vanilla") or B aligned onto A; each gets its BatchNorm statistics recomputed, and the aligned
one is shown again with REPAIR. The endpoints are the parents; the dip between them is the
barrier that alignment and renormalisation remove.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from torch import nn
from tqdm import tqdm

from otfuse.align import align
from otfuse.data import ImageData, normalize
from otfuse.evaluate import loss_and_accuracy
from otfuse.fuse import FuseConfig, groups_of, merge
from otfuse.groups import permute

CURVES = ("vanilla", "aligned", "aligned+repair")


def interpolation(models: list[nn.Module], data: ImageData, cfg: FuseConfig, points: int = 11,
                  split: str = "test", progress: bool = False) -> list[dict]:
    """Rows (alpha, curve, accuracy, loss) for every curve at `points` evenly spaced alphas in [0, 1]."""
    a, b = models
    groups = groups_of(models, normalize(data.train_x[:1], data.norm).to(next(a.parameters()).device))
    aligned_b = permute(b, groups, align(a, b, groups, cfg, data.train_x, data.norm, progress))
    # the plain average along the line: the refit would mask the barrier this plot is there to show
    plain, fixed = replace(cfg, repair=False, refit=False), replace(cfg, repair=True, refit=False)
    pairs = {"vanilla": ([a, b], plain), "aligned": ([a, aligned_b], plain), "aligned+repair": ([a, aligned_b], fixed)}
    x, y = data.split(split)
    rows = []
    alphas = [i / (points - 1) for i in range(points)]
    for alpha in tqdm(alphas, desc="interpolate", disable=True if not progress else None, leave=False):
        for curve in CURVES:
            pair, c = pairs[curve]
            model = merge(pair, [1 - alpha, alpha], groups, data.train_x, data.norm, c)[0]
            loss, acc = loss_and_accuracy(model, x, y, data.norm)
            rows.append({"alpha": round(alpha, 6), "curve": curve, "accuracy": round(acc, 4), "loss": round(loss, 6)})
    return rows


def interpolation_figure(rows: list[dict], title: str, split: str = "test"):
    """Accuracy and loss against alpha, one line per curve."""
    from otfuse.results import pyplot

    fig, (ax_acc, ax_loss) = pyplot().subplots(1, 2, figsize=(10, 4), dpi=120)
    style = {"vanilla": ("tab:gray", "o"), "aligned": ("tab:blue", "s"), "aligned+repair": ("tab:green", "^")}
    labels = {"vanilla": "vanilla average + BN reset", "aligned": "OT-aligned + BN reset", "aligned+repair": "OT-aligned + REPAIR"}
    for curve in CURVES:
        pts = [r for r in rows if r["curve"] == curve]
        if not pts:
            continue
        colour, marker = style[curve]
        al = [r["alpha"] for r in pts]
        ax_acc.plot(al, [r["accuracy"] for r in pts], color=colour, marker=marker, ms=4, label=labels[curve])
        ax_loss.plot(al, [r["loss"] for r in pts], color=colour, marker=marker, ms=4, label=labels[curve])
    for ax, what in ((ax_acc, f"{split} accuracy (%)"), (ax_loss, f"{split} loss (cross-entropy)")):
        ax.set_xlabel("alpha: weight of model B  (0 = model A, 1 = model B)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def options_note(cfg: FuseConfig) -> str:
    o = asdict(cfg)
    point = f" at {o['point']} points" if o["method"] == "activation" else ""
    return f"{o['method']}{point}, {o['n_images']} images, {o['bn_batches']} BN batches"
