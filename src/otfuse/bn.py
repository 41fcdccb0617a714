"""BatchNorm statistics recomputed after the weights changed under them, and REPAIR.

recompute_bn(model, data.train_x, data.norm, BatchNormConfig(batches=40), Precision.BF16)         # in place
repair(fused, aligned_parents, [0.5, 0.5], groups, data.train_x, data.norm, RepairConfig(), Precision.BF16)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm import tqdm

from otfuse.data import fixed_sample, image_batches
from otfuse.errors import OtfuseError
from otfuse.grouping.group import ChannelGroup, Observation
from otfuse.hooks import tapping
from otfuse.maps import channel_rows
from otfuse.precision import Precision, autocast, channels_last, full_float32

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class BatchNormConfig:
    FLAG_PREFIX: ClassVar[str] = "bn"
    batches: int = 40  # batches of training images for the BatchNorm statistics (0: keep the averaged ones)
    batch_size: int = 128  # images per BatchNorm batch
    augment: bool = False  # statistics from crop+flip batches, as training saw them (for models trained so)
    seed: int = 0  # order of the batches

    def check(self) -> None:
        if self.batches < 0:
            raise OtfuseError(f"--bn-batches {self.batches} must be 0 (keep the averaged statistics) or more")
        if self.batch_size < 2:
            raise OtfuseError(f"--bn-batch-size {self.batch_size} must be at least 2 (BatchNorm needs a spread)")


@dataclass
class RepairConfig:
    FLAG_PREFIX: ClassVar[str] = "repair"
    enabled: bool = False  # REPAIR: match each fused channel's activation mean and std to the parents'
    n_images: int = 1000  # training images (no augmentation) whose activation moments are matched
    batch_size: int = 250  # images per forward pass while measuring them
    seed: int = 0  # image sample

    def check(self) -> None:
        if self.n_images < 2:
            raise OtfuseError(f"--repair-n-images {self.n_images} is too small; use at least 2")
        if self.batch_size < 1:
            raise OtfuseError(f"--repair-batch-size {self.batch_size} must be at least 1")


@torch.no_grad()
def recompute_bn(
    model: nn.Module, images: torch.Tensor, norm: tuple, cfg: BatchNormConfig, precision: Precision, progress: bool = False
) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative average over
    `cfg.batches` shuffled batches of `images` (unaugmented, or with training's crops and flips), in
    place; returns the model in eval mode. The forward passes run in `precision`; the statistics
    accumulate in the BatchNorms' own float32 buffers."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns or cfg.batches <= 0:
        return model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    dev = next(model.parameters()).device
    size = min(cfg.batch_size, len(images))
    done, epoch = 0, 0
    try:
        with (
            tqdm(total=cfg.batches, desc="batchnorm", disable=True if not progress else None, leave=False) as bar,
            autocast(precision, dev),
        ):
            while done < cfg.batches:
                # fewer images than batches * batch_size: go round again in a new order
                for xb in image_batches(images, size, norm, seed=cfg.seed, epoch=epoch, drop_last=True, augment=cfg.augment):
                    model(channels_last(xb.to(dev), precision))
                    done += 1
                    bar.update()
                    if done == cfg.batches:
                        break
                epoch += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return model.eval()


@torch.no_grad()
def channel_moments(
    model: nn.Module,
    points: list[Observation],
    images: torch.Tensor,
    norm: tuple,
    precision: Precision,
    n_images: int = 1000,
    batch_size: int = 250,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation at each Observation (a module's input or output), on a fixed
    sample of unaugmented images; streamed, only running sums are kept."""
    sums = [[0.0, 0.0, 0] for _ in points]

    def add(k: int, p: Observation):
        def fn(x: torch.Tensor) -> None:
            rows = channel_rows(x.detach(), p.index, p.axis).float()
            s = sums[k]
            s[0], s[1], s[2] = s[0] + rows.sum(1).double(), s[1] + (rows * rows).sum(1).double(), s[2] + rows.shape[1]

        return fn

    model.eval()
    dev = next(model.parameters()).device
    with tapping(model, [(p.module, p.on, add(k, p)) for k, p in enumerate(points)]), autocast(precision, dev):
        for xb in image_batches(fixed_sample(images, n_images, seed), batch_size, norm):
            model(channels_last(xb.to(dev), precision))
    out = []
    for s1, s2, cnt in sums:
        mean = s1 / cnt
        out.append((mean, (s2 / cnt - mean * mean).clamp_min(0).sqrt()))
    return out


@torch.no_grad()
@full_float32()  # its channel statistics are float32
def repair(
    fused: nn.Module,
    parents: list[nn.Module],
    weights: list[float],
    groups: list[ChannelGroup],
    images: torch.Tensor,
    norm: tuple,
    cfg: RepairConfig,
    precision: Precision,
) -> nn.Module:
    """REPAIR-style renormalisation, in place: at every group's norm outputs (or producer outputs where
    there is no norm), give each fused channel the weighted mean of the aligned parents' activation
    mean and standard deviation, folded into that layer's affine parameters (the architecture stays)."""
    points = [p for g in groups for p in g.pre_observations if p.foldable]
    moments = lambda m: channel_moments(m, points, images, norm, precision, cfg.n_images, cfg.batch_size, cfg.seed)
    target = [
        (sum(w * m for w, (m, _) in zip(weights, ms)), sum(w * s for w, (_, s) in zip(weights, ms)))
        for ms in zip(*(moments(p) for p in parents))
    ]
    for p, (mu_t, sd_t), (mu_f, sd_f) in zip(points, target, moments(fused)):
        live = sd_f > 1e-6 * sd_f.max().clamp_min(1e-30)  # a dead channel has nothing to rescale
        scale = torch.where(live, sd_t / sd_f.clamp_min(1e-30), torch.ones_like(sd_f))
        shift = torch.where(live, mu_t - scale * mu_f, torch.zeros_like(mu_f))
        _fold(fused.get_submodule(p.module), p.index[:, 0], scale, shift)
    return fused


def _fold(module: nn.Module, channels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """out[c] -> scale[c] * out[c] + shift[c] for the given output channels, through weight and bias."""
    w = module.weight
    idx = channels.to(w.device)
    axis = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    shape = [1] * w.ndim
    shape[axis] = -1
    w.index_copy_(axis, idx, w.index_select(axis, idx) * scale.to(w).view(shape))
    if module.bias is not None:
        b = module.bias
        b.index_copy_(0, idx, b.index_select(0, idx) * scale.to(b) + shift.to(b))
