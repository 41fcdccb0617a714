"""The `weight` method: OTFusion's sequential weight-based alignment."""

from __future__ import annotations

import torch
from torch import nn

from otfuse.align.base import AlignConfig, register_method
from otfuse.align.weights import sequential_weight_maps
from otfuse.grouping.group import ChannelGroup
from otfuse.maps import ChannelMap


@register_method("weight", "Weights-base Fusion", needs_images=False)
def weight_maps(
    anchor: nn.Module,
    source: nn.Module,
    anchor_groups: list[ChannelGroup],
    source_groups: list[ChannelGroup],
    cfg: AlignConfig,
    images: torch.Tensor | None = None,
    norm: tuple | None = None,
    progress: bool = False,
) -> dict[str, ChannelMap]:
    """OTFusion's sequential weight-based alignment."""
    return sequential_weight_maps(anchor, source, anchor_groups, cfg)
