"""The `weight-matching` method: Git Re-Basin's coordinate descent over every member of every group."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from otfuse.align.base import AlignConfig, register_method
from otfuse.align.weights import AxisIndex, sequential_weight_maps
from otfuse.grouping.group import ChannelGroup, Member
from otfuse.maps import ChannelMap, block_permutation, tensor_key, tensors_of


def _beta_of(perm: torch.Tensor, g: ChannelGroup) -> torch.Tensor:
    """Which source block a block-structured permutation puts in each block."""
    first = torch.stack([(g.blocks == b).nonzero()[0, 0] for b in range(int(g.blocks.max()) + 1)])
    return g.blocks[perm[first]]


def _layer_members(g: ChannelGroup) -> list[Member]:
    """Conv/linear weights and biases, in and out: the normalisation tensors are on other scales."""
    return [m for m in g.members if m.kind == "layer"] or g.members


@register_method("weight-matching", "Weight matching", needs_images=False)
def weight_matching(
    anchor: nn.Module,
    source: nn.Module,
    anchor_groups: list[ChannelGroup],
    source_groups: list[ChannelGroup],
    cfg: AlignConfig,
    images: torch.Tensor | None = None,
    norm: tuple | None = None,
    progress: bool = False,
    max_rounds: int = 100,
) -> dict[str, ChannelMap]:
    """Git Re-Basin's coordinate descent: maximise the summed inner products of all layer members.
    It starts from the sequential weight alignment rather than the identity: fewer rounds, and a
    start that already holds the exact answer for a permuted copy. The result is a permutation
    whatever the solver: weight matching is a hard assignment."""
    groups = anchor_groups
    ta, tb, ix = tensors_of(anchor, dense=True), tensors_of(source, dense=True), AxisIndex(groups)
    start = sequential_weight_maps(anchor, source, groups, AlignConfig(method="weight"))
    perms = {name: m.perm for name, m in start.items()}
    # a grouped conv's blocks stay where the start put them; channels move within them
    betas = {g.family: _beta_of(perms[g.name], g) for g in groups if g.blocks is not None}
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for _ in range(max_rounds):
            changed = False
            for k in torch.randperm(len(groups), generator=gen).tolist():
                g = groups[k]
                maps = {name: ChannelMap.permutation(p) for name, p in perms.items()}
                sim = sum(
                    ix.view(ta[tensor_key(m)], m, g.name, {}).double() @ ix.view(tb[tensor_key(m)], m, g.name, maps).double().T
                    for m in _layer_members(g)
                )
                sim = sim.cpu().numpy()
                if g.blocks is None:
                    _, cols = linear_sum_assignment(sim, maximize=True)
                else:
                    within = lambda b, t, src, sim=sim: torch.from_numpy(
                        linear_sum_assignment(sim[t.numpy()][:, src.numpy()], maximize=True)[1]
                    )
                    cols = block_permutation(g.blocks, betas[g.family], within).numpy()
                old = perms[g.name].numpy()
                if sim[np.arange(g.size), cols].sum() > sim[np.arange(g.size), old].sum() + 1e-9 * abs(sim).max():
                    perms[g.name] = torch.from_numpy(cols).long()
                    changed = True
            if not changed:
                break
    return {name: ChannelMap.permutation(p) for name, p in perms.items()}
