"""Align a source model's channels onto an anchor's, group by group: one ChannelMap per group.

    maps = align(anchor, source, anchor_groups, source_groups, AlignConfig(method="activation"), images, norm)
    aligned = carry(source, source_groups, maps, into=anchor, into_groups=anchor_groups)

Methods live in `METHODS`; add one with `@register_method("name", ...)` on a function of the same
arguments as `activation_maps` and every command, table and study offers it:
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

import time
from dataclasses import dataclass, replace
from typing import Callable, ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm import tqdm

from otfuse.data import fixed_sample, image_batches
from otfuse.errors import OtfuseError
from otfuse.groups import ChannelGroup, Member
from otfuse.hooks import tapping
from otfuse.maps import ChannelMap, block_permutation, mix_positions, tensor_key, tensors_of, transport_map

DEAD = 1e-4  # a channel's standard deviation below this share of its group's RMS counts as constant
TIE_BREAK = 1e-3  # weight-based share of the activation cost: only separates channels activations cannot
QUANTILES = 33  # order statistics describing a channel's weights where the order of its inputs is unknown


@dataclass
class AlignConfig:
    FLAG_PREFIX: ClassVar[str] = ""  # the alignment's options keep their own names: --method, --n-images
    method: str = "activation"  # a registered method: activation | weight | weight-matching
    cost: str = "corr"  # activation cost: corr | euclidean
    point: str = "both"  # activations read after the nonlinearity ("post": consumer inputs), before it ("pre": norm outputs), or both
    mix: float = 0.0  # activation method: share of the (sequential) weight cost mixed into the activation cost
    n_images: int = 1000  # training images (no augmentation) whose activations are compared
    act_batch_size: int = 250  # images per forward pass while collecting activations
    solver: str = "emd"  # emd (exact, a permutation) | sinkhorn (soft map)
    marginals: str = "uniform"  # each channel's mass in the transport: uniform | importance (its producers' weight norm)
    reg: float = 0.01  # sinkhorn regularisation, relative to the largest cost
    seed: int = 0  # image sample and weight-matching order

    def check(self) -> None:
        if self.method not in METHODS:
            raise OtfuseError(f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.cost not in ("corr", "euclidean"):
            raise OtfuseError(f"--cost {self.cost!r} is unknown; choose corr or euclidean")
        if self.point not in ("post", "pre", "both"):
            raise OtfuseError(f"--point {self.point!r} is unknown; choose post, pre or both")
        if self.solver not in ("emd", "sinkhorn"):
            raise OtfuseError(f"--solver {self.solver!r} is unknown; choose emd or sinkhorn")
        if self.marginals not in ("uniform", "importance"):
            raise OtfuseError(f"--marginals {self.marginals!r} is unknown; choose uniform or importance")
        if not 0 <= self.mix <= 1:
            raise OtfuseError(f"--mix {self.mix} must be between 0 and 1")
        if not self.n_images >= 2:
            raise OtfuseError(f"--n-images {self.n_images} is too small; use at least 2")
        if not self.act_batch_size >= 1:
            raise OtfuseError(f"--act-batch-size {self.act_batch_size} must be at least 1")
        if self.solver == "sinkhorn" and not (np.isfinite(self.reg) and self.reg > 0):
            raise OtfuseError(f"--reg {self.reg} must be a positive number for --solver sinkhorn (e.g. 0.01)")


# --- the registry ----------------------------------------------------------------------------

MethodFn = Callable[..., dict[str, ChannelMap]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    title: str  # the column header in tables, e.g. "Activation-base Fusion"
    needs_images: bool  # reads activations on training images
    mixed_widths: bool  # can align models whose groups differ in size


METHODS: dict[str, Method] = {}


def register_method(name: str, title: str, needs_images: bool = True, mixed_widths: bool = False):
    """Register `fn(anchor, source, anchor_groups, source_groups, cfg, images, norm, progress)` -> maps."""
    def wrap(fn: MethodFn) -> MethodFn:
        METHODS[name] = Method(name, fn, title, needs_images, mixed_widths)
        return fn

    return wrap


def align(anchor: nn.Module, source: nn.Module, anchor_groups: list[ChannelGroup], source_groups: list[ChannelGroup],
          cfg: AlignConfig, images: torch.Tensor | None = None, norm: tuple | None = None, progress: bool = False,
          timings: dict[str, float] | None = None) -> dict[str, ChannelMap]:
    """One map per group from the source's channels onto the anchor's. Seconds go to `timings["alignment"]`."""
    cfg.check()
    method = METHODS[cfg.method]
    if not method.mixed_widths and any(a.size != s.size for a, s in zip(anchor_groups, source_groups)):
        mixed = [m.name for m in METHODS.values() if m.mixed_widths]
        raise OtfuseError(f"--method {cfg.method} aligns models of one width only; use --method {' or '.join(mixed)} for mixed widths")
    if method.needs_images and images is None:
        raise OtfuseError(f"the {cfg.method} method needs training images")
    t0 = time.perf_counter()
    maps = method.fn(anchor, source, anchor_groups, source_groups, cfg, images, norm, progress)
    if timings is not None:
        timings["alignment"] = timings.get("alignment", 0.0) + time.perf_counter() - t0
    return maps


# --- activations ------------------------------------------------------------------------------


@register_method("activation", "Activation-base Fusion", needs_images=True, mixed_widths=True)
def activation_maps(anchor: nn.Module, source: nn.Module, anchor_groups: list[ChannelGroup], source_groups: list[ChannelGroup],
                    cfg: AlignConfig, images: torch.Tensor, norm: tuple, progress: bool = False) -> dict[str, ChannelMap]:
    """Exact OT on activation costs; channels that activations cannot tell apart are told apart by their weights."""
    if cfg.mix > 0 and any(a.size != s.size for a, s in zip(anchor_groups, source_groups)):
        raise OtfuseError(f"--mix {cfg.mix} mixes in weight costs, which need parents of one width; use --mix 0 for mixed widths")
    costs = activation_costs(anchor, source, anchor_groups, source_groups, images, norm, cfg, progress)
    if cfg.mix > 0:
        return _sequential_weight_maps(anchor, source, anchor_groups, cfg, costs)
    costs = {ga.name: costs[ga.name] + TIE_BREAK * _invariant_cost(anchor, source, ga, gs) for ga, gs in zip(anchor_groups, source_groups)}
    betas = family_betas(costs, anchor_groups, source_groups)
    masses = {}
    if cfg.marginals == "importance":
        wa, ws = channel_importance(anchor, anchor_groups), channel_importance(source, source_groups)
        masses = {ga.name: (wa[ga.name], ws[gs.name]) for ga, gs in zip(anchor_groups, source_groups)}
    return {ga.name: group_map(costs[ga.name], ga, gs, betas, cfg, *masses.get(ga.name, ())) for ga, gs in zip(anchor_groups, source_groups)}


def channel_importance(model: nn.Module, groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Per group, each channel's share of the norm of its producers' weights (conv/linear rows; the
    norm layers' where there are none): a channel a parent barely uses carries little mass, so
    where widths differ the transport spends the target's channels on the ones that matter."""
    ts, ix, names = tensors_of(model, dense=True), _AxisIndex(groups), frozenset(g.name for g in groups)
    out = {}
    with torch.no_grad():
        for g in groups:
            rows = torch.cat([ix.view(ts[tensor_key(m)], m, g.name, {}, names - {g.name}).double() for m in _producer_weights(g)], 1)
            norm = rows.norm(dim=1).cpu()
            out[g.name] = norm + 1e-6 * norm.mean().clamp_min(1e-30)  # a dead channel keeps a sliver of mass
    return out


# --- grouped convs: blocks ---------------------------------------------------------------------


def _block_cost(cost: torch.Tensor, ga: ChannelGroup, gs: ChannelGroup) -> torch.Tensor:
    """(blocks, blocks): the exact OT cost of matching each anchor block's channels with each source block's."""
    n = int(ga.blocks.max()) + 1
    out = torch.zeros(n, n, dtype=torch.float64)
    c = cost.detach().double().cpu()
    for b in range(n):
        rows = c[ga.blocks == b]
        for b2 in range(n):
            sub = rows[:, gs.blocks == b2].numpy()
            r, k = linear_sum_assignment(sub)
            out[b, b2] = float(sub[r, k].sum())
    return out


def family_betas(costs: dict[str, torch.Tensor], anchor_groups: list[ChannelGroup], source_groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Per family of grouped-conv groups, which source block goes to each anchor block: matched by the
    exact within-block costs summed over every group of the family."""
    total: dict[str, torch.Tensor] = {}
    for ga, gs in zip(anchor_groups, source_groups):
        if ga.blocks is None or ga.name not in costs:
            continue
        if gs.blocks is None or len(gs.blocks) != len(ga.blocks):
            raise OtfuseError(f"group {ga.name} feeds a grouped conv; models of other widths cannot be aligned there")
        c = _block_cost(costs[ga.name], ga, gs)
        total[ga.family] = c if ga.family not in total else total[ga.family] + c
    pinned = {g.family for g in anchor_groups if g.pinned}
    return {f: torch.arange(len(c)) if f in pinned else torch.from_numpy(linear_sum_assignment(c.numpy())[1]).long()
            for f, c in total.items()}


def group_map(cost: torch.Tensor, ga: ChannelGroup, gs: ChannelGroup, betas: dict[str, torch.Tensor], cfg: AlignConfig,
              target_mass: torch.Tensor | None = None, source_mass: torch.Tensor | None = None) -> ChannelMap:
    """The OT map of one group (uniform marginals unless masses are given); in a grouped conv's group,
    solved within each matched pair of blocks, with uniform marginals."""
    if ga.blocks is None:
        return transport_map(cost, cfg.solver, cfg.reg, target_mass, source_mass)
    beta = betas[ga.family]
    if cfg.solver == "emd":
        within = lambda b, t, src: transport_map(cost[t][:, src], "emd").perm
        return ChannelMap.permutation(block_permutation(ga.blocks, beta, within))
    plan = torch.zeros(cost.shape, dtype=torch.float64)
    for b in range(len(beta)):
        t, src = (ga.blocks == b).nonzero().flatten(), (gs.blocks == beta[b]).nonzero().flatten()
        plan[t[:, None], src[None, :]] = transport_map(cost[t][:, src], cfg.solver, cfg.reg).plan / len(beta)
    return ChannelMap.from_plan(plan)


class _Stats:
    """Running moments for the cross-covariance of two sets of channel vectors: each batch centred on its own
    means, its products in single precision, merged into float64 totals (Chan et al.'s pairwise update).
    Centring keeps a constant channel (a saturated ReLU6) exactly constant: uncentred single-precision
    moments would give it a variance of rounding noise, and a correlation with everything."""

    def __init__(self):
        self.n = 0
        self.ma = self.mb = self.cab = self.caa = self.cbb = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.float(), b.float()
        k = a.shape[1]
        ma, mb = a.mean(1, keepdim=True), b.mean(1, keepdim=True)
        a, b = a - ma, b - mb
        cab, caa, cbb = (a @ b.T).double(), (a * a).sum(1).double(), (b * b).sum(1).double()
        ma, mb = ma[:, 0].double(), mb[:, 0].double()
        if self.n:
            da, db, f = ma - self.ma, mb - self.mb, self.n * k / (self.n + k)
            cab, caa, cbb = cab + f * da[:, None] * db[None, :], caa + f * da * da, cbb + f * db * db
            ma, mb = self.ma + da * (k / (self.n + k)), self.mb + db * (k / (self.n + k))
        self.cab, self.caa, self.cbb = self.cab + cab, self.caa + caa, self.cbb + cbb
        self.ma, self.mb, self.n = ma, mb, self.n + k

    def cost(self, kind: str) -> torch.Tensor:
        n, ma, mb = self.n, self.ma, self.mb
        aa, bb = self.caa / n + ma**2, self.cbb / n + mb**2  # raw second moments
        if kind == "euclidean":
            ab = self.cab / n + ma[:, None] * mb[None, :]
            return (aa[:, None] + bb[None, :] - 2 * ab).clamp_min(0).float()
        cov = self.cab / n
        sa, sb = (self.caa / n).clamp_min(0).sqrt(), (self.cbb / n).clamp_min(0).sqrt()
        # a channel whose spread is float noise next to the group's scale is dead: its correlations
        # would be noise, so it correlates with nothing and the weight tie-break pairs it
        live_a = sa > DEAD * aa.mean().sqrt()
        live_b = sb > DEAD * bb.mean().sqrt()
        live = live_a[:, None] & live_b[None, :]
        corr = torch.where(live, cov / (sa[:, None] * sb[None, :]).clamp_min(1e-300), torch.zeros_like(cov))
        return (1 - corr).float()


def channel_rows(x: torch.Tensor, index: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """(C, samples): the values of each group channel in a tensor x whose channels lie on `axis`."""
    if axis != 1:
        x = x.movedim(axis, 1)
    size, k = index.shape
    sel = x.index_select(1, index.reshape(-1).to(x.device))
    return sel.reshape(sel.shape[0], size, -1).transpose(0, 1).reshape(size, -1)


def observation_points(g: ChannelGroup, point: str) -> list:
    """The observations of a group to read: after the nonlinearity, before it, or both."""
    return {"post": g.observations, "pre": g.pre_observations, "both": g.observations + g.pre_observations}[point]


def activation_costs(anchor: nn.Module, source: nn.Module, anchor_groups: list[ChannelGroup], source_groups: list[ChannelGroup],
                     images: torch.Tensor, norm: tuple, cfg: AlignConfig, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per group, an (anchor channels, source channels) cost from their activations on a fixed sample of `images`."""
    stats: dict[tuple[int, int], _Stats] = {}
    held: dict[tuple[int, int], torch.Tensor] = {}  # the anchor's rows for the current batch, per (group, point)
    seen: dict = {}  # keeps the batch's tensors alive so their memory (and data_ptr) is not reused

    def on_anchor(gi: int, pi: int, obs):
        def fn(x: torch.Tensor) -> None:
            key = (gi, x.data_ptr(), tuple(obs.index.shape))  # the same tensor feeding two consumers counts once
            if key not in seen:
                seen[key] = x
                held[(gi, pi)] = channel_rows(x.detach(), obs.index, obs.axis)
        return fn

    def on_source(gi: int, pi: int, obs):
        def fn(x: torch.Tensor) -> None:
            if (gi, pi) in held:
                stats.setdefault((gi, pi), _Stats()).add(held.pop((gi, pi)), channel_rows(x.detach(), obs.index, obs.axis))
        return fn

    def taps(groups, make):
        return [(o.module, o.on, make(gi, pi, o)) for gi, g in enumerate(groups) for pi, o in enumerate(observation_points(g, cfg.point))]

    anchor.eval(), source.eval()
    dev = next(anchor.parameters()).device
    sample = fixed_sample(images, cfg.n_images, cfg.seed)
    total = -(-len(sample) // cfg.act_batch_size)
    with torch.no_grad(), tapping(anchor, taps(anchor_groups, on_anchor)), tapping(source, taps(source_groups, on_source)):
        for xb in tqdm(image_batches(sample, cfg.act_batch_size, norm), total=total, desc="activations",
                       disable=True if not progress else None, leave=False):
            seen.clear()
            anchor(xb.to(dev))
            source(xb.to(dev))
            held.clear()
    costs = {}
    for gi, g in enumerate(anchor_groups):
        per_point = [s.cost(cfg.cost) for (i, _), s in stats.items() if i == gi]
        if not per_point:
            raise OtfuseError(f"no activations reached group {g.name}; the model's forward pass skips it")
        # each point weighs the same: a stream's late, large activations must not drown its early ones;
        # costs live on the CPU, where the transport problems are solved (and every other cost is)
        costs[g.name] = (sum(per_point) / len(per_point)).cpu()
    return costs


# --- weights ----------------------------------------------------------------------------------


def _rows(t: torch.Tensor, mem: Member) -> torch.Tensor:
    """(C, rest): the member's entries for each group channel."""
    sel = t.index_select(mem.axis, mem.index.reshape(-1).to(t.device)).movedim(mem.axis, 0)
    return sel.reshape(mem.index.shape[0], -1).float()


def _quantiles(rows: torch.Tensor, k: int = QUANTILES) -> torch.Tensor:
    """k evenly spaced order statistics of each row: blind to the order of its entries, and as long for every width."""
    s = rows.sort(1).values
    return s[:, torch.linspace(0, s.shape[1] - 1, k).round().long()]


@torch.no_grad()
def _invariant_cost(anchor: nn.Module, source: nn.Module, ga: ChannelGroup, gs: ChannelGroup) -> torch.Tensor:
    """Squared distance between channels' producer weights, sorted so that no other group's order matters; scaled to [0, 1]."""
    def features(model, g):
        t = tensors_of(model)
        return torch.cat([_quantiles(_rows(t[tensor_key(m)], m)) for m in g.members if m.role == "out"] or [torch.zeros(g.size, 1)], 1)

    d = torch.cdist(features(anchor, ga).double().cpu(), features(source, gs).double().cpu()) ** 2
    return (d / d.max().clamp_min(1e-30)).float()


class _AxisIndex:
    """For each tensor, the members of all groups that act on it: to re-express a tensor in other groups' maps."""

    def __init__(self, groups: list[ChannelGroup]):
        self.by_tensor: dict[str, list[tuple[str, Member]]] = {}
        for g in groups:
            for m in g.members:
                self.by_tensor.setdefault(tensor_key(m), []).append((g.name, m))

    def view(self, t: torch.Tensor, mem: Member, own: str, maps: dict[str, ChannelMap], unknown: frozenset[str] = frozenset()) -> torch.Tensor:
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
    return [m for m in g.members if m.role == "out" and m.kind == "layer" and m.tensor == "weight"] or \
        [m for m in g.members if m.role == "out"] or g.members


def _unit(c: torch.Tensor) -> torch.Tensor:
    return c / c.max().clamp_min(1e-30)


def _sequential_weight_maps(anchor: nn.Module, source: nn.Module, groups: list[ChannelGroup], cfg: AlignConfig,
                            act_costs: dict[str, torch.Tensor] | None = None) -> dict[str, ChannelMap]:
    """OTFusion's sequential weight-based alignment, groups in forward order; with activation
    costs, the cost is their mix (weight share `cfg.mix`), both scaled to [0, 1]."""
    ta, tb, ix = tensors_of(anchor, dense=True), tensors_of(source, dense=True), _AxisIndex(groups)
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


@register_method("weight", "Weights-base Fusion", needs_images=False)
def weight_maps(anchor: nn.Module, source: nn.Module, anchor_groups: list[ChannelGroup], source_groups: list[ChannelGroup],
                cfg: AlignConfig, images: torch.Tensor | None = None, norm: tuple | None = None,
                progress: bool = False) -> dict[str, ChannelMap]:
    """OTFusion's sequential weight-based alignment."""
    return _sequential_weight_maps(anchor, source, anchor_groups, cfg)


def _beta_of(perm: torch.Tensor, g: ChannelGroup) -> torch.Tensor:
    """Which source block a block-structured permutation puts in each block."""
    first = torch.stack([(g.blocks == b).nonzero()[0, 0] for b in range(int(g.blocks.max()) + 1)])
    return g.blocks[perm[first]]


def _layer_members(g: ChannelGroup) -> list[Member]:
    """Conv/linear weights and biases, in and out: the normalisation tensors are on other scales."""
    return [m for m in g.members if m.kind == "layer"] or g.members


@register_method("weight-matching", "Weight matching", needs_images=False)
def weight_matching(anchor: nn.Module, source: nn.Module, anchor_groups: list[ChannelGroup], source_groups: list[ChannelGroup],
                    cfg: AlignConfig, images: torch.Tensor | None = None, norm: tuple | None = None,
                    progress: bool = False, max_rounds: int = 100) -> dict[str, ChannelMap]:
    """Git Re-Basin's coordinate descent: maximise the summed inner products of all layer members.
    It starts from the sequential weight alignment rather than the identity: fewer rounds, and a
    start that already holds the exact answer for a permuted copy. The result is a permutation
    whatever the solver: weight matching is a hard assignment."""
    groups = anchor_groups
    ta, tb, ix = tensors_of(anchor, dense=True), tensors_of(source, dense=True), _AxisIndex(groups)
    start = _sequential_weight_maps(anchor, source, groups, AlignConfig(method="weight"))
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
                sim = sum(ix.view(ta[tensor_key(m)], m, g.name, {}).double() @ ix.view(tb[tensor_key(m)], m, g.name, maps).double().T
                          for m in _layer_members(g))
                sim = sim.cpu().numpy()
                if g.blocks is None:
                    _, cols = linear_sum_assignment(sim, maximize=True)
                else:
                    within = lambda b, t, src: torch.from_numpy(linear_sum_assignment(sim[t.numpy()][:, src.numpy()], maximize=True)[1])
                    cols = block_permutation(g.blocks, betas[g.family], within).numpy()
                old = perms[g.name].numpy()
                if sim[np.arange(g.size), cols].sum() > sim[np.arange(g.size), old].sum() + 1e-9 * abs(sim).max():
                    perms[g.name] = torch.from_numpy(cols).long()
                    changed = True
            if not changed:
                break
    return {name: ChannelMap.permutation(p) for name, p in perms.items()}


# --- onto a target of another width ------------------------------------------------------------


def to_target_maps(anchor: nn.Module, anchor_groups: list[ChannelGroup], target_groups: list[ChannelGroup], cfg: AlignConfig,
                   images: torch.Tensor | None = None, norm: tuple | None = None, progress: bool = False) -> dict[str, ChannelMap]:
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
