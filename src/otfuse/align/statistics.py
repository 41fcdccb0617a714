"""Activation statistics: each group channel's activations on the same images in two models, as a cost."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from otfuse.align.base import DEAD, AlignConfig
from otfuse.data import fixed_sample, image_batches
from otfuse.errors import OtfuseError
from otfuse.grouping.group import ChannelGroup, Observation
from otfuse.hooks import tapping
from otfuse.maps import channel_rows
from otfuse.precision import full_float32


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


def observation_points(g: ChannelGroup, point: str) -> list:
    """The observations of a group to read: after the nonlinearity, before it, or both; a group seen at one kind of
    point only (an attention layer's q and k, read after their projection) is read there whatever `point` says."""
    chosen = {"post": g.observations, "pre": g.pre_observations, "both": g.observations + g.pre_observations}[point]
    return chosen or g.observations + g.pre_observations


def observed_rows(model: nn.Module, obs: Observation) -> Callable[[torch.Tensor], torch.Tensor]:
    """(C, samples) from the tensor an observation taps: its channels, or those of the weight it names applied to it
    (q, k and v of an attention layer whose projection is not a module of its own)."""
    weight, bias = obs.through
    if obs.unordered:  # sorted along it, each model's values line up whatever its order there
        return lambda x: channel_rows(x.sort(dim=obs.unordered).values, obs.index, obs.axis)
    if not weight:
        return lambda x: channel_rows(x, obs.index, obs.axis)
    w = model.get_parameter(weight)
    rows = obs.index.reshape(-1).to(w.device)
    w_rows, b_rows = w[rows], model.get_parameter(bias)[rows] if bias else None  # sliced once, not per batch
    index = torch.arange(rows.numel(), device=w.device).reshape(obs.index.shape)
    return lambda x: channel_rows(F.linear(x, w_rows, b_rows), index, -1)


@full_float32()
def activation_costs(
    anchor: nn.Module,
    source: nn.Module,
    anchor_groups: list[ChannelGroup],
    source_groups: list[ChannelGroup],
    images: torch.Tensor,
    norm: tuple,
    cfg: AlignConfig,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Per group, an (anchor channels, source channels) cost from their activations on a fixed sample of `images`."""
    stats: dict[tuple[int, int], _Stats] = {}
    held: dict[tuple[int, int], torch.Tensor] = {}  # the anchor's rows for the current batch, per (group, point)
    seen: dict = {}  # keeps the batch's tensors alive so their memory (and data_ptr) is not reused

    def on_anchor(gi: int, pi: int, obs, rows):
        def fn(x: torch.Tensor) -> None:
            key = (gi, x.data_ptr(), tuple(obs.index.shape), obs.through)  # the same tensor feeding two consumers counts once
            if key not in seen:
                seen[key] = x
                held[(gi, pi)] = rows(x.detach())

        return fn

    def on_source(gi: int, pi: int, obs, rows):
        def fn(x: torch.Tensor) -> None:
            if (gi, pi) in held:
                stats.setdefault((gi, pi), _Stats()).add(held.pop((gi, pi)), rows(x.detach()))

        return fn

    def taps(model, groups, make):
        return [
            (o.module, o.on, make(gi, pi, o, observed_rows(model, o)))
            for gi, g in enumerate(groups)
            for pi, o in enumerate(observation_points(g, cfg.point))
        ]

    anchor.eval(), source.eval()
    dev = next(anchor.parameters()).device
    sample = fixed_sample(images, cfg.n_images, cfg.seed)
    total = -(-len(sample) // cfg.act_batch_size)
    with torch.no_grad(), tapping(anchor, taps(anchor, anchor_groups, on_anchor)), tapping(source, taps(source, source_groups, on_source)):
        for xb in tqdm(
            image_batches(sample, cfg.act_batch_size, norm),
            total=total,
            desc="activations",
            disable=True if not progress else None,
            leave=False,
        ):
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
