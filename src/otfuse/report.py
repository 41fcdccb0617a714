"""A fusion judged against its baselines: accuracies of every model a fusion makes, and of the parents, on one split.

    fusion, acc = fusion_table(models, data, FuseConfig(), split="test")
    acc["fused"], acc["fused_average"], acc["ensemble"], acc["vanilla_bn"], acc["agree_model1"], ...
    fusion, acc = fusion_table(models, data, cfg, tasks=inputs.tasks)   # parents trained on parts of the data
    acc["fused_task1"]   # the first parent's task: its classes' images, argmax within its classes

The models are `Fusion.columns()` (the pipeline decides which exist); this module only evaluates them,
with each parent, their softmax ensemble, and the fused model's agreement with each parent. Where the
parents trained on parts of the data (`tasks`, each parent's classes), every accuracy is the joint one
(every class), and each model gets one more per task, `<column>_task<k>`.
"""

from __future__ import annotations

import torch
from torch import nn

from otfuse.data import ImageData
from otfuse.evaluate import accuracy_of_logits, agreement, ensemble_of_logits, logits, task_accuracy_of_logits
from otfuse.fusion import FuseConfig, Fusion, fuse, timed

# every accuracy column a fusion table may hold, in table order
COLUMNS = (
    "model1",
    "model2",
    "ensemble",
    "vanilla",
    "vanilla_bn",
    "vanilla_refit",
    "fused_no_bn",
    "fused_average",
    "fused",
    "fused_repair",
    "agree_model1",
    "agree_model2",
)


def fusion_table(
    models: list[nn.Module],
    data: ImageData,
    cfg: FuseConfig,
    split: str = "test",
    progress: bool = False,
    with_baselines: bool = True,
    target: nn.Module | None = None,
    tasks: list[tuple[int, ...]] | None = None,
    class_counts: torch.Tensor | None = None,
) -> tuple[Fusion, dict[str, float]]:
    """(the fusion, its accuracies on `split`): `fuse`, then `table`."""
    fusion = fuse(models, data.train_x, data.norm, cfg, target=target, progress=progress, class_counts=class_counts)
    return fusion, table(fusion, data, split, progress, with_baselines, tasks)


def table(
    fusion: Fusion,
    data: ImageData,
    split: str = "test",
    progress: bool = False,
    with_baselines: bool = True,
    tasks: list[tuple[int, ...]] | None = None,
) -> dict[str, float]:
    """The accuracies on `split` of every model of `fusion.columns(with_baselines)`, of the parents and
    their ensemble, and the fused model's agreement with each parent's predictions (%); with `tasks` (each
    parent's classes) also each one's per-task accuracy. Seconds per phase go to `fusion.seconds`."""
    x, y = data.split(split)
    columns = fusion.columns(with_baselines, progress)
    acc: dict[str, float] = {}
    score = lambda name, z: acc.update(accuracies(name, z, y, tasks))
    with timed(fusion.seconds, "evaluation", progress):
        parent = [logits(m, x, data.norm, precision=fusion.precision) for m in fusion.parents]
        for i, z in enumerate(parent):
            score(f"model{i + 1}", z)
        score("ensemble", ensemble_of_logits(parent, fusion.weights))
        for name, model in columns.items():
            z = logits(model, x, data.norm, precision=fusion.precision)
            score(name, z)
            if name == "fused":
                # a fusion that leans on one parent (e.g. blurring the other away) agrees with it far more
                acc.update({f"agree_model{i + 1}": agreement(z, p) for i, p in enumerate(parent)})
    return {k: acc[k] for k in sorted(acc, key=_column_order)}


def accuracies(name: str, z: torch.Tensor, y: torch.Tensor, tasks: list[tuple[int, ...]] | None = None) -> dict[str, float]:
    """{name: accuracy (%) of logits `z`} and, with `tasks`, {name_task<k>: its accuracy on the k-th task}."""
    out = {name: accuracy_of_logits(z, y)}
    out.update({f"{name}_task{k + 1}": task_accuracy_of_logits(z, y, classes) for k, classes in enumerate(tasks or [])})
    return out


def _column_order(name: str) -> tuple[int, str]:
    column, _, task = name.partition("_task")
    return (COLUMNS.index(column) if column in COLUMNS else len(COLUMNS), task)
