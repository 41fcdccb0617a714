"""Fuse K models of one architecture: align each to the first, average, recompute BatchNorm, refit.

    from otfuse.fuse import FuseConfig, fuse
    fused, raw, maps, timings = fuse([a, b], data.train_x, data.norm, FuseConfig(method="activation"))

`fusion_report` adds the baselines a fusion is judged against: each parent, their softmax
ensemble, vanilla averaging without alignment (with and without BatchNorm recomputation, and
refit when the fusion is), and the fusion without BatchNorm recomputation, without the refit
(the plain aligned average) and with REPAIR instead of the refit.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from otfuse.align import AlignConfig, align
from otfuse.bn import recompute_bn, repair
from otfuse.refit import refit
from otfuse.errors import OtfuseError
from otfuse.evaluate import accuracy, accuracy_of_logits, agreement, logits
from otfuse.groups import ChannelGroup, channel_groups, check_same_groups, permute
from otfuse.data import normalize


@dataclass
class FuseConfig(AlignConfig):
    bn_batches: int = 100  # batches of training images for the BatchNorm statistics (0: keep the averaged ones)
    bn_batch_size: int = 128
    bn_augment: bool = False  # BatchNorm statistics from crop+flip batches, as training saw them (for models trained so)
    weights: str = ""  # comma-separated model weights for the average; empty: equal
    repair: bool = False  # REPAIR: match each fused channel's activation mean and std to the parents'
    refit: bool = True  # refit each conv/linear layer by least squares to the parents' mean output (otfuse.refit)
    refit_ridge: float = 0.01  # refit's pull towards the parents' averaged layers (BatchNorm folded in), relative to its inputs' scale

    def check(self) -> None:
        super().check()
        if self.refit_ridge < 0:
            raise OtfuseError(f"--refit-ridge {self.refit_ridge} must be at least 0")

    def model_weights(self, k: int) -> list[float]:
        if not self.weights:
            return [1.0 / k] * k
        try:
            w = [float(v) for v in self.weights.split(",")]
        except ValueError:
            raise OtfuseError(f"--weights {self.weights!r} must be comma-separated numbers") from None
        if len(w) != k or sum(w) <= 0 or min(w) < 0:
            raise OtfuseError(f"--weights {self.weights!r}: give {k} non-negative numbers with a positive sum")
        return [v / sum(w) for v in w]


def average(models: list[nn.Module], weights: list[float]) -> nn.Module:
    """The weighted average of the models' floating-point tensors (counters taken from the first)."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for k, t in out.state_dict().items():
            if t.is_floating_point():
                t.copy_(sum(w * s[k].to(t.device) for w, s in zip(weights, states)))
    return out


def groups_of(models: list[nn.Module], example: torch.Tensor) -> list[ChannelGroup]:
    """The first model's channel groups, after checking every other model has the same ones."""
    groups = channel_groups(models[0], example)
    for m in models[1:]:
        check_same_groups(groups, channel_groups(m, example))
    return groups


def fuse(models: list[nn.Module], images: torch.Tensor, norm: tuple, cfg: FuseConfig, progress: bool = False,
         groups: list[ChannelGroup] | None = None, timings: dict[str, float] | None = None):
    """(fused model, the plain weighted average before BatchNorm recomputation, maps per model, timings)."""
    if len(models) < 2:
        raise OtfuseError("fusion needs at least two models")
    cfg.check()
    timings = {} if timings is None else timings
    groups = groups or groups_of(models, normalize(images[:1], norm).to(next(models[0].parameters()).device))
    maps, aligned = align_all(models, groups, images, norm, cfg, progress, timings)
    fused, _, raw = merge(aligned, cfg.model_weights(len(models)), groups, images, norm, cfg, progress, timings)
    return fused, raw, maps, timings


def align_all(models: list[nn.Module], groups: list[ChannelGroup], images: torch.Tensor, norm: tuple, cfg: FuseConfig,
              progress: bool = False, timings: dict[str, float] | None = None) -> tuple[list[dict], list[nn.Module]]:
    """(maps of every model after the first onto it, the models aligned: the first as it is)."""
    maps = [align(models[0], m, groups, cfg, images, norm, progress, timings) for m in models[1:]]
    return maps, [models[0]] + [permute(m, groups, mp) for m, mp in zip(models[1:], maps)]


def merge(aligned: list[nn.Module], weights: list[float], groups: list[ChannelGroup], images: torch.Tensor, norm: tuple,
          cfg: FuseConfig, progress: bool = False, timings: dict[str, float] | None = None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(merged model: BatchNorm recomputed, then REPAIR and the refit where asked; the same before REPAIR
    and the refit; the plain weighted average) of aligned models."""
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    raw = average(aligned, weights).eval()
    timings["averaging"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = recompute_bn(copy.deepcopy(raw), images, norm, cfg.bn_batches, cfg.bn_batch_size, cfg.seed, progress, cfg.bn_augment)
    timings["batchnorm"] = time.perf_counter() - t0
    fused = copy.deepcopy(plain) if cfg.repair or cfg.refit else plain
    if cfg.repair:
        t0 = time.perf_counter()
        repaired(fused, aligned, weights, groups, images, norm, cfg, progress)
        timings["repair"] = time.perf_counter() - t0
    if cfg.refit:
        t0 = time.perf_counter()
        # no BatchNorm recomputation after it: the refit leaves each BatchNorm its layer's exact statistics
        refitted(fused, aligned, weights, images, norm, cfg, progress)
        timings["refit"] = time.perf_counter() - t0
    return fused, plain, raw


def repaired(model: nn.Module, aligned: list[nn.Module], weights: list[float], groups: list[ChannelGroup],
             images: torch.Tensor, norm: tuple, cfg: FuseConfig, progress: bool = False) -> nn.Module:
    """REPAIR in place on a merged model, then BatchNorm recomputed: the corrections move every later layer's inputs."""
    repair(model, aligned, weights, groups, images, norm, cfg.n_images, cfg.seed)
    return recompute_bn(model, images, norm, cfg.bn_batches, cfg.bn_batch_size, cfg.seed, progress, cfg.bn_augment)


def refitted(model: nn.Module, parents: list[nn.Module], weights: list[float], images: torch.Tensor, norm: tuple,
             cfg: FuseConfig, progress: bool = False) -> nn.Module:
    """The refit in place on a merged model, with the sample, seed and ridge of `cfg`."""
    return refit(model, parents, weights, images, norm, cfg.n_images, cfg.seed, cfg.refit_ridge, cfg.act_batch_size, progress)


def fusion_report(models: list[nn.Module], data, cfg: FuseConfig, progress: bool = False, split: str = "test"):
    """(fused model, accuracies on `split` of the fusion, of its stages and of every baseline, plus the
    fused model's agreement with each parent's predictions (%), seconds per phase)."""
    timings: dict[str, float] = {}
    x, y = data.split(split)
    cfg.check()
    groups = groups_of(models, normalize(data.train_x[:1], data.norm).to(next(models[0].parameters()).device))
    maps, aligned = align_all(models, groups, data.train_x, data.norm, cfg, progress, timings)
    w = cfg.model_weights(len(models))
    fused, plain, raw = merge(aligned, w, groups, data.train_x, data.norm, cfg, progress, timings)
    with_repair = fused
    if not cfg.repair or cfg.refit:  # the REPAIR column: REPAIR alone, from the same alignment
        t0 = time.perf_counter()
        with_repair = repaired(copy.deepcopy(plain), aligned, w, groups, data.train_x, data.norm, cfg)
        timings["repair"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vanilla = average(models, w).eval()
    parent_logits = [logits(m, x, data.norm) for m in models]  # once: the ensemble reuses them
    acc = {f"model{i + 1}": accuracy_of_logits(z, y) for i, z in enumerate(parent_logits)}
    acc["ensemble"] = accuracy_of_logits(sum(z.softmax(1) for z in parent_logits), y)
    acc["vanilla"] = accuracy(vanilla, x, y, data.norm)
    recompute_bn(vanilla, data.train_x, data.norm, cfg.bn_batches, cfg.bn_batch_size, cfg.seed, augment=cfg.bn_augment)
    acc["vanilla_bn"] = accuracy(vanilla, x, y, data.norm)
    acc["fused_no_bn"] = accuracy(raw, x, y, data.norm)
    fused_logits = logits(fused, x, data.norm)
    acc["fused"] = accuracy_of_logits(fused_logits, y)
    # a fusion that leans on one parent (e.g. blurring the other away) agrees with it far more
    for i, z in enumerate(parent_logits):
        acc[f"agree_model{i + 1}"] = agreement(fused_logits, z)
    acc["fused_repair"] = accuracy(with_repair, x, y, data.norm)
    if cfg.refit:  # what the refit adds, and what it does without any alignment
        acc["fused_average"] = accuracy(plain, x, y, data.norm)
        refitted(vanilla, models, w, data.train_x, data.norm, cfg)
        acc["vanilla_refit"] = accuracy(vanilla, x, y, data.norm)
    timings["evaluation"] = time.perf_counter() - t0
    return fused, acc, timings
