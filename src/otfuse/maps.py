"""Channel maps: one transport plan per channel group, and carrying a model through them.

    m = ChannelMap.permutation(torch.tensor([2, 0, 1]))    # target channel c <- source channel p[c]
    m = transport_map(cost)                                 # exact OT between the rows' and the columns' channels
    same = carry(model, groups, maps)                       # permutations: a copy computing the same function
    narrow = carry(model, groups, maps, into=template, into_groups=channel_groups(template, x))   # otfuse.grouping.exact

A map is a transport plan of shape (n_target, n_source): `plan[t, s]` is the mass of source channel
`s` that goes to target channel `t`. The numbers of channels may differ, and the plan may be soft;
a permutation is the special case of one unit of mass per row and per column, applied by indexing
and exact. Carrying a model through its maps rewrites every member of every group:
- tensors that produce the channels (a conv's or linear's output axis, biases, norm parameters
  and statistics, other per-channel parameters) take, for target channel t, the mean of the
  source channels weighted by row t of the plan (barycentric projection);
- consumers' input axes take, for target channel t, each source channel's weights times the share
  of that channel's mass that went to t (columns normalised to one). A channel duplicated into two
  targets therefore has its consumers' weights halved, and the function is unchanged; two
  channels merged into one target have their consumers' weights summed.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import ot
import torch
from torch import nn

from otfuse.errors import OtfuseError

if TYPE_CHECKING:  # the group types only: maps carry what a grouping found, and the grouping's check carries maps
    from otfuse.grouping.group import ChannelGroup, Member


@dataclass(frozen=True, eq=False)
class ChannelMap:
    """A transport plan from a source's channels (columns) to the target's channels (rows)."""

    plan: torch.Tensor  # (n_target, n_source), non-negative, float64
    perm: torch.Tensor | None = None  # when the plan is a permutation: target channel c takes source perm[c]

    @classmethod
    def permutation(cls, perm: torch.Tensor) -> ChannelMap:
        perm = torch.as_tensor(perm, dtype=torch.long).cpu()
        n = len(perm)
        if not torch.equal(perm.sort().values, torch.arange(n)):
            raise OtfuseError(f"a permutation of {n} channels must hold each of 0..{n - 1} once")
        plan = torch.zeros(n, n, dtype=torch.float64)
        plan[torch.arange(n), perm] = 1.0 / n
        return cls(plan, perm)

    @classmethod
    def identity(cls, n: int) -> ChannelMap:
        return cls.permutation(torch.arange(n))

    @classmethod
    def from_plan(cls, plan: torch.Tensor) -> ChannelMap:
        """A map from any non-negative plan; a plan that is a scaled permutation matrix becomes one exactly."""
        plan = torch.as_tensor(plan, dtype=torch.float64).cpu()
        if plan.ndim != 2 or not torch.isfinite(plan).all() or (plan < 0).any():
            raise OtfuseError(f"a transport plan must be a finite, non-negative matrix; got shape {tuple(plan.shape)}")
        if (plan.sum(1) <= 0).any() or (plan.sum(0) <= 0).any():
            raise OtfuseError("a transport plan must give every target and every source channel some mass")
        n_t, n_s = plan.shape
        if n_t == n_s:
            top = plan.argmax(1)
            rest = plan.clone()
            rest[torch.arange(n_t), top] = 0
            if torch.equal(top.sort().values, torch.arange(n_t)) and bool((rest <= 1e-12 * plan.max()).all()):
                return cls.permutation(top)
        return cls(plan, None)

    @property
    def n_target(self) -> int:
        return self.plan.shape[0]

    @property
    def n_source(self) -> int:
        return self.plan.shape[1]

    def outputs(self) -> torch.Tensor:
        """(n_target, n_source): each target channel as a weighted mean of source channels (rows sum to 1)."""
        return self.plan / self.plan.sum(1, keepdim=True)

    def inputs(self) -> torch.Tensor:
        """(n_target, n_source): each source channel's consumer weights split over its targets (columns sum to 1)."""
        return self.plan / self.plan.sum(0, keepdim=True)

    def then(self, other: ChannelMap) -> ChannelMap:
        """This map followed by `other` (source -> this map's targets -> other's targets)."""
        if other.n_source != self.n_target:
            raise OtfuseError(f"cannot chain a map onto {self.n_target} channels with one from {other.n_source}")
        if self.perm is not None and other.perm is not None:
            return ChannelMap.permutation(self.perm[other.perm])
        return ChannelMap.from_plan(other.outputs() @ self.plan)


def transport_map(
    cost: torch.Tensor,
    solver: str = "emd",
    reg: float = 0.01,
    target_mass: torch.Tensor | None = None,
    source_mass: torch.Tensor | None = None,
) -> ChannelMap:
    """The optimal transport plan for `cost` (rows: target channels, columns: source channels).

    Marginals are uniform unless given. `emd` solves the problem exactly (a permutation when the
    two sides have as many channels); `sinkhorn` adds entropic regularisation `reg`, relative to the
    largest cost, and gives a soft plan."""
    m = cost.detach().double().cpu().numpy()
    n_t, n_s = m.shape
    if not np.isfinite(m).all():
        raise OtfuseError("the alignment cost holds NaN or infinite values; check the models for non-finite weights")
    a = np.full(n_t, 1.0 / n_t) if target_mass is None else _mass(target_mass)
    b = np.full(n_s, 1.0 / n_s) if source_mass is None else _mass(source_mass)
    if solver == "emd":
        # POT's default iteration cap stops short of optimal for wide layers
        plan = ot.emd(a, b, m, numItermax=max(100_000, 50 * n_t * n_s))
        plan[plan < 1e-9 * plan.max()] = 0.0  # the network simplex leaves float dust where no mass moves
    elif solver == "sinkhorn":
        scale = m.max() if m.max() > 0 else 1.0
        with warnings.catch_warnings():  # convergence is checked below, in one line of ours
            warnings.simplefilter("ignore")
            plan = ot.sinkhorn(a, b, m / scale, reg, numItermax=SINKHORN_ITERATIONS)
        if not np.isfinite(plan).all() or (plan.sum(1) <= 0).any() or (plan.sum(0) <= 0).any():
            raise OtfuseError(f"--reg {reg} is too small for Sinkhorn (the plan underflows); use --reg 0.01 or more, or --solver emd")
        off = max(np.abs(plan.sum(1) / a - 1).max(), np.abs(plan.sum(0) / b - 1).max())
        if off > SINKHORN_TOLERANCE:  # a plan that has not converged maps channels at random: a silent failure
            raise OtfuseError(
                f"--reg {reg}: Sinkhorn did not converge in {SINKHORN_ITERATIONS:,} iterations on a group of {n_t} "
                f"channels (its marginals are off by {off:.0%}); use --reg 0.01 or more, or --solver emd"
            )
    else:
        raise OtfuseError(f"--solver {solver!r} is unknown; choose emd or sinkhorn")
    return ChannelMap.from_plan(torch.from_numpy(np.ascontiguousarray(plan)))


def _mass(w: torch.Tensor) -> np.ndarray:
    w = torch.as_tensor(w, dtype=torch.float64).cpu().numpy()
    return w / w.sum()


def random_maps(groups: list[ChannelGroup], seed: int = 0, cycles: bool = False) -> dict[str, ChannelMap]:
    """A random permutation for every group; groups with blocks (grouped convs) move their channels
    within blocks, and the blocks of one family alike. With `cycles`, every permutation is one cycle
    through all its channels (and blocks): it moves each channel, and mixes any two subsets of them, so
    a group that should have been two cannot pass an exactness check by chance."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda n: _cycle(n, gen) if cycles else torch.randperm(n, generator=gen)
    families: dict[str, torch.Tensor] = {}
    out = {}
    for g in groups:
        if g.blocks is None:
            out[g.name] = ChannelMap.permutation(draw(g.size))
            continue
        n_blocks = int(g.blocks.max()) + 1
        beta = families.setdefault(g.family, torch.arange(n_blocks) if g.pinned else draw(n_blocks))
        out[g.name] = ChannelMap.permutation(block_permutation(g.blocks, beta, lambda b, t, s: draw(len(t))))
    return out


def _cycle(n: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of n that is a single n-cycle."""
    order = torch.randperm(n, generator=gen)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(1)
    return perm


def block_permutation(blocks: torch.Tensor, beta: torch.Tensor, within) -> torch.Tensor:
    """The permutation taking, for each block b, the channels of block beta[b] into the places of block b's
    channels, in the order `within(b, targets, sources)` gives (positions into `sources`)."""
    perm = torch.empty(len(blocks), dtype=torch.long)
    for b in range(len(beta)):
        targets = (blocks == b).nonzero().flatten()
        sources = (blocks == beta[b]).nonzero().flatten()
        if len(targets) != len(sources):
            raise OtfuseError(f"blocks {b} and {int(beta[b])} of a grouped conv hold different numbers of channels")
        perm[targets] = sources[within(b, targets, sources)]
    return perm


def tensors_of(model: nn.Module, dense: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by its full name, and every parametrised weight as computed (read-only:
    carrying writes the tensors it is computed from); with `dense`, grouped convs' weights in their dense
    block-diagonal form, whose input axis counts every input channel (what channel groups index)."""
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    for name, mod in model.named_modules():
        for t in getattr(mod, "parametrizations", {}).keys():
            with torch.no_grad():
                out[f"{name}.{t}" if name else t] = getattr(mod, t).detach()
    if dense:
        for name, g in grouped_convs(model).items():
            out[f"{name}.weight"] = to_dense(out[f"{name}.weight"], g)
    return out


def grouped_convs(model: nn.Module) -> dict[str, int]:
    """Convs with groups > 1 that are not depthwise, by name: their number of groups."""
    return {
        n: m.groups
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups > 1 and not m.groups == m.in_channels == m.out_channels
    }


def to_dense(w: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in / groups, *k) -> (out, in, *k): the grouped weight as a block-diagonal dense one."""
    out, per_in = w.shape[0], w.shape[1]
    dense = w.new_zeros((out, per_in * groups, *w.shape[2:]))
    per_out = out // groups
    for g in range(groups):
        dense[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] = w[g * per_out : (g + 1) * per_out]
    return dense


def to_grouped(dense: torch.Tensor, groups: int, what: str) -> torch.Tensor:
    """The inverse of `to_dense`; weights outside the diagonal blocks mean the maps broke the groups."""
    out, full = dense.shape[0], dense.shape[1]
    per_out, per_in = out // groups, full // groups
    blocks = [dense[g * per_out : (g + 1) * per_out, g * per_in : (g + 1) * per_in] for g in range(groups)]
    inside = sum(float(b.abs().sum()) for b in blocks)
    if float(dense.abs().sum()) - inside > 1e-6 * max(inside, 1e-30):
        raise OtfuseError(
            f"{what} is a grouped conv (groups={groups}) and the maps move channels across its blocks; "
            "align with block-structured maps (use --solver emd and parents of one width)"
        )
    return torch.cat(blocks)


def tensor_key(mem: Member) -> str:
    return f"{mem.module}.{mem.tensor}" if mem.module else mem.tensor


def carry(
    model: nn.Module,
    groups: list[ChannelGroup],
    maps: dict[str, ChannelMap],
    into: nn.Module | None = None,
    into_groups: list[ChannelGroup] | None = None,
) -> nn.Module:
    """A copy of `into` (default: of `model`) holding `model`'s tensors carried through one map per group.

    `groups` are `model`'s groups; `into_groups` are the target's (default: the same), matched by name.
    A group without a map keeps its channels (its sizes must then agree)."""
    target = copy.deepcopy(into if into is not None else model)
    dst_groups = {g.name: g for g in (into_groups or groups)}
    src, dst = tensors_of(model, dense=True), stored_tensors(target)
    grouped = {f"{n}.weight": g for n, g in grouped_convs(target).items()}
    work: dict[str, dict[int, list]] = {}  # tensor -> axis -> [(source index, target index, map, role)]
    for g in groups:
        tg = dst_groups.get(g.name)
        if tg is None:
            raise OtfuseError(f"group {g.name} has no counterpart in the target model; carry onto a model of the same architecture")
        m = maps.get(g.name) or (ChannelMap.identity(g.size) if g.size == tg.size else None)
        if m is None or (m.n_source, m.n_target) != (g.size, tg.size):
            shape = "none" if m is None else f"{m.n_target}x{m.n_source}"
            raise OtfuseError(f"group {g.name}: a map from {g.size} to {tg.size} channels is needed, got {shape}")
        targets = {(t.module, t.tensor, t.axis): t for t in tg.members}
        for mem in g.members:
            tm = targets.get((mem.module, mem.tensor, mem.axis))
            if tm is None or tm.index.shape[1] != mem.index.shape[1]:
                raise OtfuseError(f"group {g.name}: {tensor_key(mem)} is laid out differently in the target model")
            work.setdefault(tensor_key(mem), {}).setdefault(mem.axis, []).append((mem.index, tm.index, m, mem.role))
    with torch.no_grad():
        for key, t in src.items():
            if key not in dst:
                continue  # a parametrised weight: computed from the stored tensors carried here
            out = t
            for axis, items in work.get(key, {}).items():
                length = dst[key].shape[axis] * (grouped[key] if key in grouped and axis == 1 else 1)
                out = _carry_axis(out, axis, items, length)
            if key in grouped:
                out = to_grouped(out, grouped[key], key)
            if out.shape != dst[key].shape:
                raise OtfuseError(f"{key} has shape {tuple(out.shape)} after carrying but {tuple(dst[key].shape)} in the target model")
            dst[key].copy_(out)
    return target.train(model.training)


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model stores (parameters and buffers), by full name: what carrying writes."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _carry_axis(t: torch.Tensor, axis: int, items: list, new_len: int) -> torch.Tensor:
    """`t` with every group's positions on `axis` carried through its map; other positions kept in order."""
    old_len = t.shape[axis]
    src_used = torch.cat([s.reshape(-1) for s, _, _, _ in items])
    dst_used = torch.cat([d.reshape(-1) for _, d, _, _ in items])
    rest_src = _complement(src_used, old_len)
    rest_dst = _complement(dst_used, new_len)
    if len(rest_src) != len(rest_dst):
        raise OtfuseError(f"an axis of {old_len} positions cannot be carried onto {new_len}: the ungrouped positions differ")
    if new_len == old_len and all(m.perm is not None for _, _, m, _ in items) and all(torch.equal(s, d) for s, d, _, _ in items):
        # permutations on an unchanged layout: one gather, exact
        src = torch.arange(old_len)
        for s, _, m, _ in items:
            src[s.reshape(-1)] = s[m.perm].reshape(-1)
        return t.index_select(axis, src.to(t.device))
    shape = list(t.shape)
    shape[axis] = new_len
    out = t.new_zeros(shape)
    out.index_copy_(axis, rest_dst.to(t.device), t.index_select(axis, rest_src.to(t.device)))
    for s, d, m, role in items:
        out.index_copy_(axis, d.reshape(-1).to(t.device), mix_positions(t, axis, s, m, role))
    return out


def mix_positions(t: torch.Tensor, axis: int, index: torch.Tensor, m: ChannelMap, role: str = "out") -> torch.Tensor:
    """The positions `index` (n_source, k) of `t` on `axis` carried to the target channels: n_target * k
    positions along `axis`. `role` "out" takes weighted means (producers, activations), "in" splits
    each source's weights over its targets (consumers' input axes)."""
    flat = index.reshape(-1).to(t.device)
    if m.perm is not None:
        return t.index_select(axis, index[m.perm].reshape(-1).to(t.device))
    n_s, k = index.shape
    sel = t.index_select(axis, flat).movedim(axis, 0)
    rest = sel.shape[1:]
    mat = (m.outputs() if role == "out" else m.inputs()).to(device=t.device, dtype=t.dtype)
    mixed = mat @ sel.reshape(n_s, -1)
    return mixed.reshape((mat.shape[0] * k, *rest)).movedim(0, axis)


def _complement(used: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[used] = False
    return keep.nonzero().flatten()


def output_maps(groups: list[ChannelGroup], maps: dict[str, ChannelMap]) -> dict[str, list[tuple[torch.Tensor, ChannelMap]]]:
    """For every conv/linear layer that produces a group's channels: (the channels' index on its output, the
    group's map) for each group it produces (several for a depthwise conv after a concatenation). What
    carries that layer's (and its norm's) activations onto the target's channels (`carry_outputs`)."""
    out: dict[str, list[tuple[torch.Tensor, ChannelMap]]] = {}
    for g in groups:
        for m in g.members:
            if m.role == "out" and m.kind == "layer" and m.tensor == "weight" and g.name in maps:
                out.setdefault(m.module, []).append((m.index, maps[g.name]))
    return out


def carry_outputs(t: torch.Tensor, axis: int, parts: list[tuple[torch.Tensor, ChannelMap]]) -> torch.Tensor:
    """A layer's activations `t` carried onto the target's channels through `parts` (from `output_maps`)."""
    if len(parts) == 1:
        index, m = parts[0]
        return mix_positions(t, axis, index, m)
    if any(m.n_target != m.n_source for _, m in parts):
        raise OtfuseError(
            "a layer whose outputs span several channel groups (a depthwise conv after a concatenation) "
            "can be fused at its own width only; leave --width out"
        )
    out = t
    for index, m in parts:  # each group's positions, from the original activations
        out = out.index_copy(axis, index.reshape(-1).to(t.device), mix_positions(t, axis, index, m))
    return out


def permute(model: nn.Module, groups: list[ChannelGroup], perms: dict[str, torch.Tensor | ChannelMap]) -> nn.Module:
    """A copy of `model` with each group's channels permuted (target channel c <- channel perms[g][c])."""
    maps = {k: v if isinstance(v, ChannelMap) else ChannelMap.permutation(v) for k, v in perms.items()}
    return carry(model, groups, maps)


SINKHORN_ITERATIONS = 10_000
SINKHORN_TOLERANCE = 1e-3  # largest relative error of a Sinkhorn plan's marginals taken as converged


def channel_rows(x: torch.Tensor, index: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """(C, samples): the values of each group channel in a tensor x whose channels lie on `axis`."""
    if axis != 1:
        x = x.movedim(axis, 1)
    size, k = index.shape
    sel = x.index_select(1, index.reshape(-1).to(x.device))
    return sel.reshape(sel.shape[0], size, -1).transpose(0, 1).reshape(size, -1)
