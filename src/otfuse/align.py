"""Align model B's channels onto model A's, group by group.

    maps = align(model_a, model_b, groups, AlignConfig(method="activation"), images=x)
    aligned_b = permute(model_b, groups, maps)

Methods:
- `activation`: per-channel activations at each group's observation points on the same
  images; cost `corr` (1 - Pearson correlation) or `euclidean`; streamed, so only running sums
  and one batch of activations per point are held.
- `weight`: OTFusion's sequential scheme: groups in forward order, each channel described by its
  producers' weights, with B's input axes aligned where already known (and made
  permutation-invariant by sorting where not).
- `weight-matching`: Git Re-Basin's coordinate descent over all members of every group.

The transport problem is solved exactly (`emd`: a permutation) or with entropic regularisation
(`sinkhorn`: a soft map used by barycentric projection).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm import tqdm

from otfuse.data import fixed_sample, image_batches
from otfuse.errors import OtfuseError
from otfuse.groups import ChannelGroup, Member, apply_map

METHODS = ("activation", "weight", "weight-matching")
DEAD = 1e-4  # a channel's standard deviation below this share of its group's RMS counts as constant
TIE_BREAK = 1e-3  # weight-based share of the activation cost: only separates channels activations cannot


@dataclass
class AlignConfig:
    method: str = "activation"  # activation | weight | weight-matching
    cost: str = "corr"  # activation cost: corr | euclidean
    point: str = "both"  # activations read after the nonlinearity ("post": consumer inputs), before it ("pre": norm outputs), or both
    mix: float = 0.0  # activation method: share of the (sequential) weight cost mixed into the activation cost
    n_images: int = 1000  # training images (no augmentation) whose activations are compared
    act_batch_size: int = 250  # images per forward pass while collecting activations
    solver: str = "emd"  # emd (exact, a permutation) | sinkhorn (soft map)
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
        if not 0 <= self.mix <= 1:
            raise OtfuseError(f"--mix {self.mix} must be between 0 and 1")
        if self.n_images < 2:
            raise OtfuseError(f"--n-images {self.n_images} is too small; use at least 2")


def align(a: nn.Module, b: nn.Module, groups: list[ChannelGroup], cfg: AlignConfig,
          images: torch.Tensor | None = None, norm: tuple | None = None, progress: bool = False,
          timings: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """One map per group that brings B onto A: pass it to `permute(b, groups, maps)`.
    Seconds spent collecting activations and solving the transport are added to `timings`."""
    cfg.check()
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    if cfg.method == "activation":
        if images is None:
            raise OtfuseError("the activation method needs images")
        costs = activation_costs(a, b, groups, images, norm, cfg, progress)
        t1 = time.perf_counter()
        timings["activations"] = timings.get("activations", 0.0) + t1 - t0
        if cfg.mix > 0:
            maps = weight_maps(a, b, groups, cfg, costs)
        else:
            maps = {g.name: transport_map(costs[g.name] + TIE_BREAK * _invariant_cost(a, b, g), cfg) for g in groups}
    elif cfg.method == "weight":
        t1, maps = t0, weight_maps(a, b, groups, cfg)
    else:
        t1, maps = t0, weight_matching(a, b, groups, cfg)
    timings["cost_and_ot"] = timings.get("cost_and_ot", 0.0) + time.perf_counter() - t1
    return maps


# --- optimal transport ---------------------------------------------------------------------


def transport_map(cost: torch.Tensor, cfg: AlignConfig) -> torch.Tensor:
    """Rows: A's channels, columns: B's. A permutation p (A's c <- B's p[c]) or a row-stochastic matrix."""
    m = cost.detach().double().cpu().numpy()
    n = m.shape[0]
    w = np.full(n, 1.0 / n)
    if cfg.solver == "emd":
        plan = ot.emd(w, w, m, numItermax=max(100_000, 50 * n * n))  # POT's default stops short of optimal for wide layers
        return torch.from_numpy(plan.argmax(1)).long()
    scale = m.max() if m.max() > 0 else 1.0
    plan = ot.sinkhorn(w, w, m / scale, cfg.reg)
    plan = plan / plan.sum(1, keepdims=True)
    return torch.from_numpy(plan).float()


# --- activation statistics ------------------------------------------------------------------


class _Stats:
    """Running sums for the cross-covariance of two sets of C channel vectors."""

    def __init__(self):
        self.n = 0
        self.ab = self.a = self.b = self.aa = self.bb = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.n += a.shape[1]
        self.ab = self.ab + a @ b.T
        self.a, self.b = self.a + a.sum(1), self.b + b.sum(1)
        self.aa, self.bb = self.aa + (a * a).sum(1), self.bb + (b * b).sum(1)

    def cost(self, kind: str) -> torch.Tensor:
        n = self.n
        if kind == "euclidean":
            return ((self.aa[:, None] + self.bb[None, :] - 2 * self.ab) / n).clamp_min(0).float()
        ma, mb = self.a / n, self.b / n
        cov = self.ab / n - ma[:, None] * mb[None, :]
        sa = (self.aa / n - ma**2).clamp_min(0).sqrt()
        sb = (self.bb / n - mb**2).clamp_min(0).sqrt()
        # a channel whose spread is float noise next to the group's scale is dead: its correlations
        # would be noise, so it correlates with nothing and the weight tie-break pairs it
        live_a = sa > DEAD * (self.aa / n).mean().sqrt()
        live_b = sb > DEAD * (self.bb / n).mean().sqrt()
        live = live_a[:, None] & live_b[None, :]
        corr = torch.where(live, cov / (sa[:, None] * sb[None, :]).clamp_min(1e-300), torch.zeros_like(cov))
        return (1 - corr).float()


def channel_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(C, samples): the values of each group channel in a layer input x of shape (N, channels, ...)."""
    size, k = index.shape
    sel = x.index_select(1, index.reshape(-1).to(x.device))
    return sel.reshape(sel.shape[0], size, -1).transpose(0, 1).reshape(size, -1)


def activation_costs(a: nn.Module, b: nn.Module, groups: list[ChannelGroup], images: torch.Tensor, norm: tuple,
                     cfg: AlignConfig, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per group, a (C, C) cost between A's and B's channels from their activations on `images`."""
    stats: dict[tuple[str, int], _Stats] = {}
    held: dict[tuple[str, int], torch.Tensor] = {}  # A's rows for the current batch, per (group, point)
    chosen = {"post": lambda g: g.observations, "pre": lambda g: g.pre_observations,
              "both": lambda g: g.observations + g.pre_observations}[cfg.point]
    points = [(g, i, o) for g in groups for i, o in enumerate(chosen(g))]
    seen: dict = {}  # holds the tensors for the batch so their memory is not reused by a later one

    def hook_a(g, i, o):
        def fn(_mod, inputs):
            x = inputs[0]
            key = (g.name, x.data_ptr(), tuple(o.index.shape))  # the same tensor feeding two consumers counts once
            if key not in seen:
                seen[key] = x
                held[(g.name, i)] = channel_rows(x.detach(), o.index)
        return fn

    def hook_b(g, i, o):
        def fn(_mod, inputs):
            if (g.name, i) in held:
                stats.setdefault((g.name, i), _Stats()).add(held.pop((g.name, i)), channel_rows(inputs[0].detach(), o.index))
        return fn

    def register(model, g, i, o, make):
        mod = model.get_submodule(o.module)
        if o.on == "input":
            return mod.register_forward_pre_hook(make(g, i, o))
        return mod.register_forward_hook(lambda m, inp, out, fn=make(g, i, o): fn(m, (out,)))

    handles = [register(a, g, i, o, hook_a) for g, i, o in points]
    handles += [register(b, g, i, o, hook_b) for g, i, o in points]
    a.eval(), b.eval()
    dev = next(a.parameters()).device
    try:
        with torch.no_grad():
            sample = fixed_sample(images, cfg.n_images, cfg.seed)
            total = -(-len(sample) // cfg.act_batch_size)
            for xb in tqdm(image_batches(sample, cfg.act_batch_size, norm),
                           total=total, desc="activations", disable=True if not progress else None, leave=False):
                seen.clear()
                a(xb.to(dev))
                b(xb.to(dev))
                held.clear()
    finally:
        for h in handles:
            h.remove()
    costs = {}
    for g in groups:
        per_point = [s.cost(cfg.cost) for (name, _), s in stats.items() if name == g.name]
        if not per_point:
            raise OtfuseError(f"no activations reached group {g.name}; the model's forward pass skips it")
        # each point weighs the same: a stream's late, large activations must not drown its early ones
        costs[g.name] = sum(per_point) / len(per_point)
    return costs


# --- weights --------------------------------------------------------------------------------


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out


def _key(mem: Member) -> str:
    return f"{mem.module}.{mem.tensor}" if mem.module else mem.tensor


def _rows(t: torch.Tensor, mem: Member) -> torch.Tensor:
    """(C, rest): the member's entries for each group channel."""
    sel = t.index_select(mem.axis, mem.index.reshape(-1).to(t.device)).movedim(mem.axis, 0)
    return sel.reshape(mem.index.shape[0], -1).float()


def _quantiles(rows: torch.Tensor, k: int = 33) -> torch.Tensor:
    """k evenly spaced order statistics of each row: blind to the order of its entries, and short."""
    s = rows.sort(1).values
    if s.shape[1] <= k:
        return s
    return s[:, torch.linspace(0, s.shape[1] - 1, k).round().long()]


def _invariant_cost(a: nn.Module, b: nn.Module, g: ChannelGroup) -> torch.Tensor:
    """Squared distance between channels' producer weights, sorted so that no other group's order matters; scaled to [0, 1]."""
    ta, tb = _tensors(a), _tensors(b)
    fa = torch.cat([_quantiles(_rows(ta[_key(m)], m)) for m in g.members if m.role == "out"] or [torch.zeros(g.size, 1)], 1)
    fb = torch.cat([_quantiles(_rows(tb[_key(m)], m)) for m in g.members if m.role == "out"] or [torch.zeros(g.size, 1)], 1)
    d = torch.cdist(fa.double(), fb.double()) ** 2
    return (d / d.max().clamp_min(1e-30)).float()


class _AxisIndex:
    """For each tensor, the members of all groups that act on it: to re-express a tensor in other groups' maps."""

    def __init__(self, groups: list[ChannelGroup]):
        self.by_tensor: dict[str, list[tuple[str, Member]]] = {}
        for g in groups:
            for m in g.members:
                self.by_tensor.setdefault(_key(m), []).append((g.name, m))

    def view(self, t: torch.Tensor, mem: Member, own: str, maps: dict[str, torch.Tensor], unknown: set[str] = frozenset()) -> torch.Tensor:
        """Rows of `mem` in `t` after applying the other groups' `maps` on the other axes; axes of
        `unknown` groups are sorted, so the rows do not depend on those groups' order."""
        sort_axes = set()
        for name, other in self.by_tensor[_key(mem)]:
            if name == own or other.axis == mem.axis:
                continue
            if name in maps:
                t = apply_map(t, other.axis, other.index.to(t.device), maps[name].to(t.device))
            elif name in unknown:
                sort_axes.add(other.axis)
        for ax in sort_axes:
            t = t.sort(ax).values
        return _rows(t, mem)


def _producer_weights(g: ChannelGroup) -> list[Member]:
    """The out-members that are conv/linear weights: BatchNorm statistics, on another scale, would drown them."""
    return [m for m in g.members if m.role == "out" and m.kind == "layer" and m.tensor == "weight"] or \
        [m for m in g.members if m.role == "out"] or g.members


def _unit(c: torch.Tensor) -> torch.Tensor:
    return c / c.max().clamp_min(1e-30)


def weight_maps(a: nn.Module, b: nn.Module, groups: list[ChannelGroup], cfg: AlignConfig,
                act_costs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """OTFusion's sequential weight-based alignment, groups in forward order; with activation
    costs, the cost is their mix (weight share `cfg.mix`), both scaled to [0, 1]."""
    ta, tb, ix = _tensors(a), _tensors(b), _AxisIndex(groups)
    maps: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for g in groups:
            outs = _producer_weights(g)
            unknown = {h.name for h in groups} - set(maps)
            fa = torch.cat([ix.view(ta[_key(m)], m, g.name, {}, unknown) for m in outs], 1)
            fb = torch.cat([ix.view(tb[_key(m)], m, g.name, maps, unknown) for m in outs], 1)
            cost = torch.cdist(fa.double(), fb.double()) ** 2
            if act_costs is not None:
                cost = (1 - cfg.mix) * _unit(act_costs[g.name].double()) + cfg.mix * _unit(cost)
            maps[g.name] = transport_map(cost, cfg)
    return maps


def _layer_members(g: ChannelGroup) -> list[Member]:
    """Conv/linear weights and biases, in and out: the normalisation tensors are on other scales."""
    return [m for m in g.members if m.kind == "layer"] or g.members


def weight_matching(a: nn.Module, b: nn.Module, groups: list[ChannelGroup], cfg: AlignConfig, max_rounds: int = 100) -> dict[str, torch.Tensor]:
    """Git Re-Basin's coordinate descent: maximise the summed inner products of all layer members.
    It starts from the sequential weight alignment rather than the identity: fewer rounds, and a
    start that already holds the exact answer for a permuted copy."""
    ta, tb, ix = _tensors(a), _tensors(b), _AxisIndex(groups)
    maps = weight_maps(a, b, groups, AlignConfig(method="weight"))
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for _ in range(max_rounds):
            changed = False
            for k in torch.randperm(len(groups), generator=gen).tolist():
                g = groups[k]
                sim = sum(ix.view(ta[_key(m)], m, g.name, {}).double() @ ix.view(tb[_key(m)], m, g.name, maps).double().T
                          for m in _layer_members(g))
                sim = sim.cpu().numpy()
                _, cols = linear_sum_assignment(sim, maximize=True)
                old = maps[g.name].numpy()
                if sim[np.arange(g.size), cols].sum() > sim[np.arange(g.size), old].sum() + 1e-9 * abs(sim).max():
                    maps[g.name] = torch.from_numpy(cols).long()
                    changed = True
            if not changed:
                break
    if cfg.solver == "sinkhorn":
        return {name: torch.eye(len(p))[p] for name, p in maps.items()}  # weight matching is a hard assignment
    return maps
