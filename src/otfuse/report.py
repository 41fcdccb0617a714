"""A fusion judged against its baselines: accuracies of every model a fusion makes, and of the parents, on one split.

    fusion, acc = fusion_table(models, data, FuseConfig(), split="test")
    acc["fused"], acc["fused_average"], acc["ensemble"], acc["vanilla_bn"], acc["agree_model1"], ...

The models are `Fusion.columns()` (the pipeline decides which exist); this module only evaluates them,
with each parent, their softmax ensemble, and the fused model's agreement with each parent.
"""

from __future__ import annotations

from torch import nn

from otfuse.data import ImageData
from otfuse.evaluate import accuracy_of_logits, agreement, ensemble_of_logits, logits
from otfuse.fusion import FuseConfig, Fusion, fuse, timed

# every accuracy column a fusion table may hold, in table order
COLUMNS = ("model1", "model2", "ensemble", "vanilla", "vanilla_bn", "vanilla_refit", "fused_no_bn", "fused_average",
           "fused", "fused_repair", "agree_model1", "agree_model2")


def fusion_table(models: list[nn.Module], data: ImageData, cfg: FuseConfig, split: str = "test", progress: bool = False,
                 with_baselines: bool = True, target: nn.Module | None = None) -> tuple[Fusion, dict[str, float]]:
    """(the fusion, its accuracies on `split`): `fuse`, then `table`."""
    fusion = fuse(models, data.train_x, data.norm, cfg, target=target, progress=progress)
    return fusion, table(fusion, data, split, progress, with_baselines)


def table(fusion: Fusion, data: ImageData, split: str = "test", progress: bool = False,
          with_baselines: bool = True) -> dict[str, float]:
    """The accuracies on `split` of every model of `fusion.columns(with_baselines)`, of the parents and
    their ensemble, and the fused model's agreement with each parent's predictions (%). Seconds per phase go
    to `fusion.seconds`."""
    x, y = data.split(split)
    columns = fusion.columns(with_baselines, progress)
    with timed(fusion.seconds, "evaluation", progress):
        parent = [logits(m, x, data.norm, precision=fusion.precision) for m in fusion.parents]
        acc = {f"model{i + 1}": accuracy_of_logits(z, y) for i, z in enumerate(parent)}
        acc["ensemble"] = accuracy_of_logits(ensemble_of_logits(parent, fusion.weights), y)
        for name, model in columns.items():
            z = logits(model, x, data.norm, precision=fusion.precision)
            acc[name] = accuracy_of_logits(z, y)
            if name == "fused":
                # a fusion that leans on one parent (e.g. blurring the other away) agrees with it far more
                acc.update({f"agree_model{i + 1}": agreement(z, p) for i, p in enumerate(parent)})
    return {k: acc[k] for k in sorted(acc, key=_column_order)}


def _column_order(name: str) -> int:
    return COLUMNS.index(name) if name in COLUMNS else len(COLUMNS)
