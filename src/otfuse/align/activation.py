"""The `activation` method: exact OT on activation costs, with a weight tie-break."""

from __future__ import annotations

import torch
from torch import nn

from otfuse.align.base import TIE_BREAK, AlignConfig, family_betas, group_map, register_method
from otfuse.align.statistics import activation_costs
from otfuse.align.weights import channel_importance, invariant_cost, sequential_weight_maps
from otfuse.errors import OtfuseError
from otfuse.grouping.group import ChannelGroup
from otfuse.maps import ChannelMap


@register_method("activation", "Activation-base Fusion", needs_images=True, mixed_widths=True)
def activation_maps(
    anchor: nn.Module,
    source: nn.Module,
    anchor_groups: list[ChannelGroup],
    source_groups: list[ChannelGroup],
    cfg: AlignConfig,
    images: torch.Tensor,
    norm: tuple,
    progress: bool = False,
) -> dict[str, ChannelMap]:
    """Exact OT on activation costs; channels that activations cannot tell apart are told apart by their weights."""
    if cfg.mix > 0 and any(a.size != s.size for a, s in zip(anchor_groups, source_groups)):
        raise OtfuseError(f"--mix {cfg.mix} mixes in weight costs, which need parents of one width; use --mix 0 for mixed widths")
    costs = activation_costs(anchor, source, anchor_groups, source_groups, images, norm, cfg, progress)
    if cfg.mix > 0:
        return sequential_weight_maps(anchor, source, anchor_groups, cfg, costs)
    costs = {ga.name: costs[ga.name] + TIE_BREAK * invariant_cost(anchor, source, ga, gs) for ga, gs in zip(anchor_groups, source_groups)}
    betas = family_betas(costs, anchor_groups, source_groups)
    masses = {}
    if cfg.marginals == "importance":
        wa, ws = channel_importance(anchor, anchor_groups), channel_importance(source, source_groups)
        masses = {ga.name: (wa[ga.name], ws[gs.name]) for ga, gs in zip(anchor_groups, source_groups)}
    return {
        ga.name: group_map(costs[ga.name], ga, gs, betas, cfg, *masses.get(ga.name, ())) for ga, gs in zip(anchor_groups, source_groups)
    }
