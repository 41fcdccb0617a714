"""Align a source model's channels onto an anchor's, group by group: one ChannelMap per group.

    maps = align(anchor, source, anchor_groups, source_groups, AlignConfig(method="activation"), images, norm)
    aligned = carry(source, source_groups, maps, into=anchor, into_groups=anchor_groups)

A package, one module per method (`activation`, `weight`, `matching`) beside what they share:
`base` (the config, the registry, one group's transport), `statistics` (activation costs),
`weights` (weight costs) and `widths` (maps onto another width). Methods live in `METHODS`; add one with
`@register_method("name", ...)` on a function of the same arguments as `activation_maps` and every command, table
and study offers it:
- `activation`: per-channel activations at each group's observation points on the same
  images; cost `corr` (1 - Pearson correlation) or `euclidean`; streamed, so only running sums
  and one batch of activations per point are held. The two models may differ in width.
- `weight`: OTFusion's sequential scheme: groups in forward order, each channel described by its
  producers' weights, with the source's input axes aligned where already known (and made
  permutation-invariant by sorting where not).
- `weight-matching`: Git Re-Basin's coordinate descent over all members of every group.

The transport problem is solved exactly (`emd`: a permutation for models of one width) or with
entropic regularisation (`sinkhorn`: a soft plan).
"""

from __future__ import annotations

# isort: off
# the methods register as they are imported: this order is the tables' column order
from otfuse.align.base import METHODS, AlignConfig, Method, align, family_betas, group_map, register_method
from otfuse.align.activation import activation_maps
from otfuse.align.weight import weight_maps
from otfuse.align.matching import weight_matching

# isort: on
from otfuse.align.statistics import activation_costs, observation_points
from otfuse.align.weights import channel_importance
from otfuse.align.widths import merge_plan, split_plan, to_target_maps

__all__ = [
    "METHODS",
    "AlignConfig",
    "Method",
    "activation_costs",
    "activation_maps",
    "align",
    "channel_importance",
    "family_betas",
    "group_map",
    "merge_plan",
    "observation_points",
    "register_method",
    "split_plan",
    "to_target_maps",
    "weight_maps",
    "weight_matching",
]
