"""Accuracy and loss along the line between two models, without and with alignment.

    otfuse interpolate A.pt B.pt                     # results/interp-<dataset>-<arch>-w<width>-<A>-<B>-<hash>.{csv,png}
    otfuse interpolate A.pt B.pt --points 21 --method weight-matching

At each alpha the model (1 - alpha) * A + alpha * B' is evaluated, where B' is B itself
("vanilla") or B aligned onto A; each gets its BatchNorm statistics recomputed, and the aligned
one is shown again with REPAIR. The endpoints are the parents; the dip between them is the
barrier that alignment and renormalisation remove. Every point is one call of the fusion
pipeline (`otfuse.fusion.fuse`) with the weights (1 - alpha, alpha) and the alignment found once.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from tqdm import tqdm

from otfuse.align import align
from otfuse.data import ImageData
from otfuse.evaluate import loss_and_accuracy
from otfuse.fusion import FuseConfig, fuse
from otfuse.grouping.exact import groups_of
from otfuse.maps import ChannelMap
from otfuse.precision import resolve_precision

CURVES = ("vanilla", "aligned", "aligned+repair")


def interpolation(
    models: list[nn.Module], data: ImageData, cfg: FuseConfig, points: int = 11, split: str = "test", progress: bool = False
) -> list[dict]:
    """Rows (alpha, curve, accuracy, loss) for every curve at `points` evenly spaced alphas in [0, 1]."""
    a, b = models
    ga, gb = groups_of(models, data.train_x, data.norm)
    keep = {g.name: ChannelMap.identity(g.size) for g in ga}
    precision = resolve_precision(cfg.precision, next(a.parameters()).device)
    aligned = [keep, align(a, b, ga, gb, cfg.align, data.train_x, data.norm, progress)]  # float32, as in `fuse`
    identity = [keep, keep]
    # the plain average along the line: the refit would mask the barrier this plot is there to show
    plain = replace(cfg, repair=replace(cfg.repair, enabled=False), refit=replace(cfg.refit, enabled=False))
    fixed = replace(plain, repair=replace(cfg.repair, enabled=True))
    curves = {"vanilla": (identity, plain), "aligned": (aligned, plain), "aligned+repair": (aligned, fixed)}
    x, y = data.split(split)
    rows = []
    alphas = [i / (points - 1) for i in range(points)]
    for alpha in tqdm(alphas, desc="interpolate", disable=True if not progress else None, leave=False):
        for curve in CURVES:
            maps, c = curves[curve]
            model = fuse(models, data.train_x, data.norm, replace(c, weights=f"{1 - alpha},{alpha}"), maps=maps).fused
            loss, acc = loss_and_accuracy(model, x, y, data.norm, precision)
            rows.append({"alpha": round(alpha, 6), "curve": curve, "accuracy": round(acc, 4), "loss": round(loss, 6)})
    return rows


def options_note(cfg: FuseConfig) -> str:
    point = f" at {cfg.align.point} points" if cfg.align.method == "activation" else ""
    return f"{cfg.align.method}{point}, {cfg.align.n_images} images, {cfg.bn.batches} BN batches"
