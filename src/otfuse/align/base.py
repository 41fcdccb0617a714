"""The alignment's config, the method registry, and the transport of one group (grouped convs' blocks included).

maps = align(anchor, source, anchor_groups, source_groups, AlignConfig(method="activation"), images, norm)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from otfuse.errors import OtfuseError
from otfuse.grouping.group import ChannelGroup
from otfuse.maps import ChannelMap, block_permutation, transport_map
from otfuse.precision import full_float32

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
    rounds: int = 1  # 1: every model aligned onto the first; each more: every model re-aligned onto the last round's average

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
        if not 1 <= self.rounds <= 10:
            raise OtfuseError(f"--rounds {self.rounds} must be from 1 (align onto the first model) to 10")
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


@full_float32()  # the maps must not depend on the device: TF32 rounding flips near-tied channels
def align(
    anchor: nn.Module,
    source: nn.Module,
    anchor_groups: list[ChannelGroup],
    source_groups: list[ChannelGroup],
    cfg: AlignConfig,
    images: torch.Tensor | None = None,
    norm: tuple | None = None,
    progress: bool = False,
) -> dict[str, ChannelMap]:
    """One map per group from the source's channels onto the anchor's."""
    cfg.check()
    method = METHODS[cfg.method]
    if not method.mixed_widths and any(a.size != s.size for a, s in zip(anchor_groups, source_groups)):
        mixed = [m.name for m in METHODS.values() if m.mixed_widths]
        raise OtfuseError(f"--method {cfg.method} aligns models of one width only; use --method {' or '.join(mixed)} for mixed widths")
    if method.needs_images and images is None:
        raise OtfuseError(f"the {cfg.method} method needs training images")
    return method.fn(anchor, source, anchor_groups, source_groups, cfg, images, norm, progress)


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


def family_betas(
    costs: dict[str, torch.Tensor], anchor_groups: list[ChannelGroup], source_groups: list[ChannelGroup]
) -> dict[str, torch.Tensor]:
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
    return {
        f: torch.arange(len(c)) if f in pinned else torch.from_numpy(linear_sum_assignment(c.numpy())[1]).long() for f, c in total.items()
    }


def group_map(
    cost: torch.Tensor,
    ga: ChannelGroup,
    gs: ChannelGroup,
    betas: dict[str, torch.Tensor],
    cfg: AlignConfig,
    target_mass: torch.Tensor | None = None,
    source_mass: torch.Tensor | None = None,
) -> ChannelMap:
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
