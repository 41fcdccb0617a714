"""A fusion judged against its baselines: accuracies of every stage and every baseline on one split.

    fusion, acc = fusion_table(models, data, FuseConfig(), split="test")
    acc["fused"], acc["fused_average"], acc["ensemble"], acc["vanilla_bn"], acc["agree_model1"], ...

The baselines: each parent, their softmax ensemble, and vanilla averaging without alignment
(as it is, with BatchNorm recomputed, and refit when the fusion is). The stages: the fusion as
configured, the aligned average before BatchNorm recomputation (`fused_no_bn`) and after it
(`fused_average`, "average only"), and REPAIR applied to that average (`fused_repair`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from otfuse.bn import recompute_bn
from otfuse.data import ImageData
from otfuse.evaluate import accuracy_of_logits, agreement, logits
from otfuse.fusion import FuseConfig, Fusion, average, fuse, repaired, same_widths, timed
from otfuse.refit import refit

# every accuracy column a fusion table may hold, in table order
COLUMNS = ("model1", "model2", "ensemble", "vanilla", "vanilla_bn", "vanilla_refit", "fused_no_bn", "fused_average",
           "fused", "fused_repair", "agree_model1", "agree_model2")


def baselines(models: list[nn.Module], weights: list[float], images: torch.Tensor, norm: tuple, cfg: FuseConfig,
              precision: str = "fp32") -> dict[str, nn.Module]:
    """Vanilla averaging without alignment: as it is, with BatchNorm recomputed, and refit when `cfg` refits."""
    vanilla = average(models, weights).eval()
    out = {"vanilla": vanilla, "vanilla_bn": recompute_bn(copy.deepcopy(vanilla), images, norm, cfg.bn, precision=precision)}
    if cfg.refit.enabled:
        out["vanilla_refit"] = refit(copy.deepcopy(out["vanilla_bn"]), models, weights, images, norm, cfg.refit, precision=precision)
    return out


def fusion_table(models: list[nn.Module], data: ImageData, cfg: FuseConfig, split: str = "test", progress: bool = False,
                 with_baselines: bool = True, target: nn.Module | None = None) -> tuple[Fusion, dict[str, float]]:
    """(the fusion, its accuracies on `split`): `fuse`, then `table`."""
    fusion = fuse(models, data.train_x, data.norm, cfg, target=target, progress=progress)
    return fusion, table(fusion, models, data, cfg, split, progress, with_baselines)


def table(fusion: Fusion, models: list[nn.Module], data: ImageData, cfg: FuseConfig, split: str = "test",
          progress: bool = False, with_baselines: bool = True) -> dict[str, float]:
    """The accuracies on `split` of a fusion of `models` made with `cfg`: every stage, every baseline, and
    the fused model's agreement with each parent's predictions (%). Seconds per phase go to
    `fusion.seconds`. Vanilla averaging and REPAIR need parents of the fused model's shapes; with other
    widths their columns are left out."""
    x, y = data.split(split)
    seconds = fusion.seconds
    stages = {"fused_no_bn": fusion.raw, "fused_average": fusion.average, "fused": fusion.model}
    if cfg.repair.enabled and not cfg.refit.enabled:
        stages["fused_repair"] = fusion.model
    elif same_widths(fusion.maps):  # the REPAIR column: REPAIR alone, from the same alignment (one width only)
        with timed(seconds, "repair", progress):
            stages["fused_repair"] = repaired(copy.deepcopy(fusion.average), fusion.aligned, fusion.weights, fusion.groups,
                                              data.train_x, data.norm, cfg, fusion.precision)
    if with_baselines and len(models) > 1 and all(_same_shapes(m, fusion.model) for m in models):
        with timed(seconds, "baselines", progress):
            stages.update(baselines(models, fusion.weights, data.train_x, data.norm, cfg, fusion.precision))
    with timed(seconds, "evaluation", progress):
        parent = [logits(m, x, data.norm, precision=fusion.precision) for m in models]
        acc = {f"model{i + 1}": accuracy_of_logits(z, y) for i, z in enumerate(parent)}
        acc["ensemble"] = accuracy_of_logits(sum(w * z.softmax(1) for w, z in zip(fusion.weights, parent)), y)
        for name, model in stages.items():
            z = logits(model, x, data.norm, precision=fusion.precision)
            acc[name] = accuracy_of_logits(z, y)
            if name == "fused":
                # a fusion that leans on one parent (e.g. blurring the other away) agrees with it far more
                acc.update({f"agree_model{i + 1}": agreement(z, p) for i, p in enumerate(parent)})
    return {k: acc[k] for k in sorted(acc, key=_column_order)}


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def _column_order(name: str) -> int:
    return COLUMNS.index(name) if name in COLUMNS else len(COLUMNS)
