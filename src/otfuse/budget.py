"""Budgeted fusion: the parents merged where their channels match, kept apart where they do not, in one model
that may be wider than a parent in the channel groups where merging loses most.

    fusion = fuse_within_budget(models, model_from_meta(meta, k * width), 1.25, images, norm, cfg)   # the whole pipeline

    wide = side_by_side(aligned, model_from_meta(meta, k * width), images, norm)   # exactly their ensemble
    fusion = budgeted(wide, k, unmerged, images, norm, cfg)    # unmerged: group -> channels kept one per parent

The K aligned parents sit side by side in a model K times as wide (parent k's channel c of a group at position
k * C + c). Each group is zipped by a transport plan from those K * C channels to C + (K - 1) * u: a merged channel
takes the weighted mean of its K copies (consumers read it with the sum of their K columns, so each parent's
consumers keep their weights), an unmerged one stays one channel per parent. The target is the wide model pruned by
Torch-Pruning to those widths; `otfuse.fusion.fuse` then carries the wide model through the plans onto it and runs
the usual stages (BatchNorm, refit to the ensemble's activations carried through the plans). With nothing unmerged
it is the full merge (the aligned average, before BatchNorm); with everything unmerged, the ensemble.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import nn

from otfuse.distill import passes
from otfuse.errors import OtfuseError
from otfuse.fusion import FuseConfig, Fusion, distilled, fuse, head_weights
from otfuse.grouping.adapter import pruned_channels
from otfuse.grouping.exact import channel_groups
from otfuse.grouping.group import ChannelGroup, Member, example_input
from otfuse.maps import ChannelMap
from otfuse.transplant import side_by_side


def producer(group: ChannelGroup) -> Member:
    """The member that writes a group's channels: its first layer's output weight."""
    return next(m for m in group.members if m.role == "out" and m.tensor == "weight" and m.kind == "layer")


def zip_plan(group: ChannelGroup, k: int, unmerged: set[int], weights: list[float]) -> ChannelMap:
    """The plan from a side-by-side group's K * C channels to C + (K - 1) * len(unmerged): channel c of every parent
    into one target channel (mass `weights[parent]` each), or, for c in `unmerged`, one target channel per parent."""
    positions = producer(group).index[:, 0]
    if group.size % k:
        raise OtfuseError(f"group {group.name} has {group.size} channels, not a multiple of the {k} models side by side")
    c = group.size // k
    column = {int(p): j for j, p in enumerate(positions)}  # a position in the producer -> the group channel
    rows: list[list[tuple[int, float]]] = []
    for ch in range(c):
        copies = [(column[i * c + ch], weights[i]) for i in range(k)]
        rows += [[cp] for cp in copies] if ch in unmerged else [copies]
    plan = torch.zeros(len(rows), group.size, dtype=torch.float64)
    for r, entries in enumerate(rows):
        for j, w in entries:
            plan[r, j] = w
    return ChannelMap.from_plan(plan)


def budgeted(wide: nn.Module, k: int, unmerged: dict[str, set[int]], images: torch.Tensor, norm: tuple, cfg: FuseConfig) -> Fusion:
    """The fusion of the K models side by side in `wide` (`otfuse.transplant.side_by_side` of the aligned parents),
    each group's channels in `unmerged` (by group name) kept one per parent, the others merged."""
    x = example_input(images, norm, wide)
    groups = channel_groups(wide, x)
    weights = cfg.model_weights(k)
    plans = {g.name: zip_plan(g, k, unmerged.get(g.name, set()), weights) for g in groups}
    drops = {}
    for g in groups:
        c, keep = g.size // k, unmerged.get(g.name, set())
        drops[producer(g).module] = [i * c + ch for i in range(1, k) for ch in range(c) if ch not in keep]
    template = pruned_channels(copy.deepcopy(wide), x, drops)
    return fuse([wide], images, norm, replace(cfg, weights=""), maps=[plans], target=template)


def layer_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates of each conv and linear layer in one forward pass on `x` (a dense count)."""
    macs: dict[str, int] = {}

    def hook(name: str, layer: nn.Module):
        def count(_module, _inputs, out):
            per_output = layer.weight[0].numel()  # inputs (per group) times kernel positions each output reads
            macs[name] = macs.get(name, 0) + out.numel() // out.shape[0] * per_output

        return count

    handles = [m.register_forward_hook(hook(n, m)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return macs


def match_quality(wide: nn.Module, group: ChannelGroup, k: int) -> torch.Tensor:
    """Per channel c of a side-by-side group, how alike its K copies are: the least cosine similarity between parent
    0's producer weights for c and another parent's (aligned parents: 1 is the same channel)."""
    member = producer(group)
    w = dict(wide.named_parameters())[f"{member.module}.weight" if member.module else "weight"].detach().flatten(1)
    c = group.size // k
    first = w[:c]
    return torch.stack([nn.functional.cosine_similarity(first, w[i * c : (i + 1) * c], dim=1) for i in range(1, k)]).min(0).values


def unmerged_for_budget(wide: nn.Module, k: int, budget: float, images: torch.Tensor, norm: tuple) -> dict[str, set[int]]:
    """The channels to keep one per parent so the fused model's multiply-accumulates stay within `budget` times one
    parent's: across all groups, the most unlike per multiply-accumulate it costs first, each taken while the estimate
    stays within the budget (a layer's count scales with its input and output widths; a depthwise conv's with its
    channels)."""
    x = example_input(images, norm, wide)
    groups = channel_groups(wide, x)
    macs = layer_macs(wide, x)
    layers = dict(wide.named_modules())
    sides: dict[str, list[tuple[str, int]]] = {}  # layer -> (group, axis) of its output (0) and input (1) channels
    for g in groups:
        for m in g.members:
            if m.tensor == "weight" and m.kind == "layer" and m.module in macs:
                sides.setdefault(m.module, []).append((g.name, 0 if m.role == "out" else 1))
    full = {g.name: g.size // k for g in groups}
    extra = {g.name: 0 for g in groups}  # channels kept apart so far, per copy beyond the first

    def total() -> float:
        out = 0.0
        for name, count in macs.items():
            scale = 1.0
            depthwise = getattr(layers[name], "groups", 1) > 1
            for group, axis in sides.get(name, []):
                if depthwise and axis == 1:
                    continue  # a depthwise conv's input is its output group
                scale *= (full[group] + (k - 1) * extra[group]) / (k * full[group])
            out += count * scale if sides.get(name) else count / k
        return out

    parent = total()  # nothing unmerged: one parent's width
    cost = {}
    for g in groups:  # what one more channel kept apart costs in each group, at the start
        extra[g.name] = 1
        cost[g.name] = max(total() - parent, 1e-9)
        extra[g.name] = 0
    # the most unlike channels per multiply-accumulate first
    order = sorted((-(1 - float(q)) / cost[g.name], g.name, c) for g in groups for c, q in enumerate(match_quality(wide, g, k)))
    unmerged: dict[str, set[int]] = {}
    for _, name, c in order:
        extra[name] += 1
        if total() > budget * parent * (1 + 1e-9):  # the estimate of everything apart is K * K times to rounding
            extra[name] -= 1
            continue
        unmerged.setdefault(name, set()).add(c)
    return unmerged


def fuse_within_budget(
    models: list[nn.Module],
    wide: nn.Module,
    budget: float,
    images: torch.Tensor,
    norm: tuple,
    cfg: FuseConfig,
    progress: bool = False,
    class_counts: torch.Tensor | None = None,
) -> Fusion:
    """The K `models` fused into one of at most `budget` times one model's multiply-accumulates (1: the full merge;
    K * K: every channel kept apart, their ensemble as one dense model, whose blocks between parents are zero until
    the refit fills them): aligned by `cfg`'s method, placed side by side in `wide` (their architecture at K times
    their width, fresh), the most unlike channels per multiply-accumulate kept one per parent, the rest merged,
    then BatchNorm and the refit to the wide model's activations, and last the distillation of `cfg` from the K
    models themselves. The fusion's `seconds` count every phase. `class_counts` as `fuse()`'s (`--weights sizes`,
    `--head counts`, and the distillation's auto passes: one where they differ)."""
    k = len(models)
    check_budget(budget, k, 0, "")
    off = {"refit": replace(cfg.refit, enabled=False), "repair": replace(cfg.repair, enabled=False)}
    aligning = replace(cfg, distill=replace(cfg.distill, epochs=0), **off)
    first = fuse(models, images, norm, aligning, progress=progress, class_counts=class_counts)
    wide = side_by_side(first.aligned, wide, images, norm)
    unmerged = unmerged_for_budget(wide, k, budget, images, norm)
    out = budgeted(wide, k, unmerged, images, norm, replace(cfg, weights=",".join(map(repr, first.weights)), distill=aligning.distill))
    # the distillation's teachers are the K parents, whose class counts weigh its target, not the wide model
    head = head_weights(cfg, class_counts, first.weights)
    distilled(
        out.fused, models, first.weights, head, images, norm, cfg, out.precision, passes(cfg.distill, class_counts), out.seconds, progress
    )
    out.seconds = {"alignment": first.seconds.get("groups", 0.0) + first.seconds.get("alignment", 0.0), **out.seconds}
    out.parents, out.weights = list(models), first.weights  # a report's parents and ensemble are the K models, not `wide`
    return out


def macs_ratio(model: nn.Module, parent: nn.Module, images: torch.Tensor, norm: tuple) -> float:
    """`model`'s multiply-accumulates in times `parent`'s (one image, dense count)."""
    x = example_input(images, norm, parent)
    return sum(layer_macs(model, x).values()) / sum(layer_macs(parent, x).values())


def check_budget(budget: float, n_checkpoints: int, width: int, merge_until: str) -> None:
    """`--budget` alone, before anything is loaded (0: not asked for): one clear error for each thing it cannot do."""
    if not budget:
        return
    most = n_checkpoints * n_checkpoints  # every channel apart: a layer K times as wide on both sides costs K * K times
    if not (math.isfinite(budget) and 1.0 <= budget <= most):
        raise OtfuseError(
            f"--budget {budget:g}: give 1 (the full merge) to {most} times one parent's FLOPs (every channel of the "
            f"{n_checkpoints} parents kept apart, in one dense model)"
        )
    if width:
        raise OtfuseError("--budget keeps the parents' width wherever channels merge: leave --width out")
    if merge_until:
        raise OtfuseError("--budget and --merge-until are two ways to keep parents apart: choose one")
