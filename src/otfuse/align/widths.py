"""Maps from a model's channels onto a target of another width: balanced clustering to narrow, splitting to widen."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from otfuse.align.base import AlignConfig
from otfuse.align.statistics import activation_costs
from otfuse.errors import OtfuseError
from otfuse.grouping.group import ChannelGroup
from otfuse.maps import ChannelMap, transport_map


def to_target_maps(
    anchor: nn.Module,
    anchor_groups: list[ChannelGroup],
    target_groups: list[ChannelGroup],
    cfg: AlignConfig,
    images: torch.Tensor | None = None,
    norm: tuple | None = None,
    progress: bool = False,
) -> dict[str, ChannelMap]:
    """Maps from the anchor's channels onto a target's that may have fewer or more channels per group.

    Same size: the identity. Fewer: the anchor's channels are clustered into as many balanced groups of
    correlated channels as the target has (exact OT assignment, refined like k-means), and each target
    channel is the mean of its cluster: channels that compute nearly the same feature are merged
    first, so the least is lost. More: each anchor channel is split over consecutive target channels,
    which keeps the function exactly (the consumers' weights are divided among the copies)."""
    narrow = [(ga, gt) for ga, gt in zip(anchor_groups, target_groups) if gt.size < ga.size]
    corr: dict[str, torch.Tensor] = {}
    if narrow:
        if images is None:
            raise OtfuseError("fusing into a narrower model needs training images to tell which channels to merge")
        ga_list = [ga for ga, _ in narrow]
        # read before the nonlinearity: a channel the ReLU silences on the sample still has a partner there
        pre = replace(cfg, point="pre", cost="corr")
        corr = {k: 1 - c.double() for k, c in activation_costs(anchor, anchor, ga_list, ga_list, images, norm, pre, progress).items()}
    out = {}
    for ga, gt in zip(anchor_groups, target_groups):
        if gt.size == ga.size:
            out[ga.name] = ChannelMap.identity(ga.size)
        elif gt.size < ga.size:
            out[ga.name] = merge_plan(corr[ga.name], gt.size)
        else:
            out[ga.name] = split_plan(ga.size, gt.size)
    return out


def split_plan(n_source: int, n_target: int) -> ChannelMap:
    """Each source channel spread over consecutive target channels, in order (uniform marginals)."""
    t = (torch.arange(n_target, dtype=torch.float64) + 0.5) / n_target
    s = (torch.arange(n_source, dtype=torch.float64) + 0.5) / n_source
    return transport_map((t[:, None] - s[None, :]) ** 2)


def merge_plan(corr: torch.Tensor, n_target: int, rounds: int = 20) -> ChannelMap:
    """Balanced clustering of n channels into n_target by their correlation matrix: each target channel
    takes n / n_target of them (exact OT), refined by moving each target to its members' mean."""
    c = corr.clone()
    c.fill_diagonal_(1.0)  # a channel always matches itself, dead or alive
    n = len(c)
    centers = [int(c.sum(1).argmax())]  # the most typical channel first, then the least covered ones
    for _ in range(n_target - 1):
        covered = c[:, centers].max(1).values
        covered[centers] = float("inf")
        centers.append(int(covered.argmin()))
    members = torch.zeros(n_target, n, dtype=torch.float64)
    members[torch.arange(n_target), torch.tensor(centers)] = 1.0
    plan = None
    for _ in range(rounds):
        cov = members @ c  # a target channel (mean of standardised members) against every channel
        spread = (cov * members).sum(1).clamp_min(1e-12).sqrt()
        new = transport_map(1.0 - cov / spread[:, None]).plan
        if plan is not None and torch.equal(new, plan):
            break
        plan = new
        members = plan / plan.sum(1, keepdim=True)
    return ChannelMap.from_plan(plan)
