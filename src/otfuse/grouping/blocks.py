"""Blocks: the channels a grouped conv or a GroupNorm splits into groups, which may move only within their block,
and the groups whose blocks must move alike linked into one family.

    link_blocks(model, groups)     # sets each group's `blocks`, `family` and `pinned`
"""

from __future__ import annotations

import torch
from torch import nn

from otfuse.errors import OtfuseError
from otfuse.grouping.group import CONV, ChannelGroup, depthwise


def link_blocks(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Give the groups a grouped conv reads and writes, and those a GroupNorm normalises, their block structure,
    and link them into one family: a permutation may move channels only within their block (a conv group, a
    norm group), and must move the blocks of every linked side alike."""
    where = {(m.module, m.axis): g for g in groups for m in g.members if m.conv_groups > 1 and m.tensor == "weight"}
    normed = {n: g for g in groups for n in g.norm_blocks}
    parent = {g.name: g.name for g in groups}

    def find(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    first_of: dict[str, str] = {}
    for g in groups:  # families given when found (an attention layer's heads)
        if g.family:
            parent[find(g.name)] = find(first_of.setdefault(g.family, g.name))
    for name, mod in model.named_modules():
        if isinstance(mod, CONV) and mod.groups > 1 and not depthwise(mod):
            sides = [(where.get((name, 1)), mod.in_channels, mod.groups, 1), (where.get((name, 0)), mod.out_channels, mod.groups, 0)]
        elif isinstance(mod, nn.GroupNorm) and mod.num_groups > 1:
            sides = [(normed.get(name), mod.num_channels, mod.num_groups, None)]
        else:
            continue
        pinned = False
        for i, (g, channels, n_blocks, axis) in enumerate(sides):
            if g is None:
                continue
            if axis is None:
                first = torch.tensor([p[0] for p in g.norm_blocks[name]])
            else:
                index = next(m for m in g.members if m.module == name and m.tensor == "weight" and m.axis == axis).index
                if axis == 0 and _spans_blocks(index, channels // n_blocks, n_blocks):
                    # each channel has one output in every block (ResNeSt's radix paths, summed later): the outputs take
                    # any permutation, but a block of inputs cannot move to another block's outputs, so the inputs' blocks stay
                    sides[i], pinned = (None, channels, n_blocks, axis), True
                    continue
                first = index[:, 0]
            blocks = first // (channels // n_blocks)
            if g.blocks is not None and not torch.equal(g.blocks, blocks):
                raise OtfuseError(
                    f"module {name}: its channels are split into blocks that another grouped layer splits "
                    f"differently (groups={n_blocks}); they cannot be permuted exactly"
                )
            g.blocks = blocks
        linked = [g for g, *_ in sides if g is not None]
        for g in linked:
            g.pinned = g.pinned or pinned
        for g in linked[1:]:
            parent[find(g.name)] = find(linked[0].name)
    pinned = {find(g.name) for g in groups if g.pinned}
    for g in groups:
        if g.blocks is not None:
            g.family = find(g.name)
            g.pinned = g.family in pinned


def _spans_blocks(index: torch.Tensor, size: int, n_blocks: int) -> bool:
    """Whether every channel has exactly one position in each of the n_blocks blocks of `size` channels."""
    return index.shape[1] == n_blocks > 1 and bool((torch.sort(index // size, 1).values == torch.arange(n_blocks)).all())
