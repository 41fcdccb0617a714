"""Weight costs: channels described by their weights, with the axes of groups already aligned carried through
their maps, and OTFusion's sequential weight-based alignment built on them."""

from __future__ import annotations

import torch
from torch import nn

from otfuse.align.base import QUANTILES, AlignConfig, family_betas, group_map
from otfuse.grouping.group import ChannelGroup, Member
from otfuse.maps import ChannelMap, mix_positions, tensor_key, tensors_of


def _rows(t: torch.Tensor, mem: Member) -> torch.Tensor:
    """(C, rest): the member's entries for each group channel."""
    sel = t.index_select(mem.axis, mem.index.reshape(-1).to(t.device)).movedim(mem.axis, 0)
    return sel.reshape(mem.index.shape[0], -1).float()


def _quantiles(rows: torch.Tensor, k: int = QUANTILES) -> torch.Tensor:
    """k evenly spaced order statistics of each row: blind to the order of its entries, and as long for every width."""
    s = rows.sort(1).values
    return s[:, torch.linspace(0, s.shape[1] - 1, k).round().long()]


@torch.no_grad()
def invariant_cost(anchor: nn.Module, source: nn.Module, ga: ChannelGroup, gs: ChannelGroup) -> torch.Tensor:
    """Squared distance between channels' producer weights, sorted so that no other group's order matters; scaled to [0, 1]."""

    def features(model, g):
        t = tensors_of(model)
        return torch.cat([_quantiles(_rows(t[tensor_key(m)], m)) for m in g.members if m.role == "out"] or [torch.zeros(g.size, 1)], 1)

    d = torch.cdist(features(anchor, ga).double().cpu(), features(source, gs).double().cpu()) ** 2
    return (d / d.max().clamp_min(1e-30)).float()


class AxisIndex:
    """For each tensor, the members of all groups that act on it: to re-express a tensor in other groups' maps."""

    def __init__(self, groups: list[ChannelGroup]):
        self.by_tensor: dict[str, list[tuple[str, Member]]] = {}
        for g in groups:
            for m in g.members:
                self.by_tensor.setdefault(tensor_key(m), []).append((g.name, m))

    def view(
        self, t: torch.Tensor, mem: Member, own: str, maps: dict[str, ChannelMap], unknown: frozenset[str] = frozenset()
    ) -> torch.Tensor:
        """Rows of `mem` in `t` after carrying the other groups' axes through `maps`; axes of `unknown`
        groups are sorted, so the rows do not depend on those groups' order."""
        sort_axes = set()
        for name, other in self.by_tensor[tensor_key(mem)]:
            if name == own or other.axis == mem.axis:
                continue
            if name in maps:
                t = _carried(t, other, maps[name])
            elif name in unknown:
                sort_axes.add(other.axis)
        for ax in sort_axes:
            t = t.sort(ax).values
        return _rows(t, mem)


def _carried(t: torch.Tensor, mem: Member, m: ChannelMap) -> torch.Tensor:
    """`t` with `mem`'s positions replaced by their image under `m` (models of one width)."""
    return t.index_copy(mem.axis, mem.index.reshape(-1).to(t.device), mix_positions(t, mem.axis, mem.index, m, mem.role))


def _producer_weights(g: ChannelGroup) -> list[Member]:
    """The out-members that are conv/linear weights: BatchNorm statistics, on another scale, would drown them."""
    return (
        [m for m in g.members if m.role == "out" and m.kind == "layer" and m.tensor == "weight"]
        or [m for m in g.members if m.role == "out"]
        or g.members
    )


def _unit(c: torch.Tensor) -> torch.Tensor:
    return c / c.max().clamp_min(1e-30)


def sequential_weight_maps(
    anchor: nn.Module, source: nn.Module, groups: list[ChannelGroup], cfg: AlignConfig, act_costs: dict[str, torch.Tensor] | None = None
) -> dict[str, ChannelMap]:
    """OTFusion's sequential weight-based alignment, groups in forward order; with activation
    costs, the cost is their mix (weight share `cfg.mix`), both scaled to [0, 1]."""
    ta, tb, ix = tensors_of(anchor, dense=True), tensors_of(source, dense=True), AxisIndex(groups)
    maps: dict[str, ChannelMap] = {}
    betas: dict[str, torch.Tensor] = {}
    wa, wb = (channel_importance(anchor, groups), channel_importance(source, groups)) if cfg.marginals == "importance" else ({}, {})
    with torch.no_grad():
        for g in groups:
            outs = _producer_weights(g)
            unknown = frozenset(h.name for h in groups) - set(maps)
            fa = torch.cat([ix.view(ta[tensor_key(m)], m, g.name, {}, unknown) for m in outs], 1)
            fb = torch.cat([ix.view(tb[tensor_key(m)], m, g.name, maps, unknown) for m in outs], 1)
            cost = torch.cdist(fa.double(), fb.double()).cpu() ** 2
            if act_costs is not None:
                cost = (1 - cfg.mix) * _unit(act_costs[g.name].double()) + cfg.mix * _unit(cost)
            if g.blocks is not None and g.family not in betas:  # the family's blocks follow its first group
                betas.update(family_betas({g.name: cost}, [g], [g]))
            maps[g.name] = group_map(cost, g, g, betas, cfg, wa.get(g.name), wb.get(g.name))
    return maps


def channel_importance(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Per group, each channel's share of the norm of its producers' weights (conv/linear rows; the
    norm layers' where there are none): a channel a parent barely uses carries little mass, so
    where widths differ the transport spends the target's channels on the ones that matter."""
    ts, ix, names = tensors_of(model, dense=True), AxisIndex(groups), frozenset(g.name for g in groups)
    out = {}
    with torch.no_grad():
        for g in groups:
            rows = torch.cat([ix.view(ts[tensor_key(m)], m, g.name, {}, names - {g.name}).double() for m in _producer_weights(g)], 1)
            norm = rows.norm(dim=1).cpu()
            out[g.name] = norm + 1e-6 * norm.mean().clamp_min(1e-30)  # a dead channel keeps a sliver of mass
    return out
