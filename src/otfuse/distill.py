"""Distil the fused model from its parents on the fusion's unlabelled images: the last stage of a fusion, and the loss
of `otfuse finetune --distill`.

    from otfuse.distill import DistillConfig, distill
    distill(fused, parents, [0.5, 0.5], data.train_x, data.norm, DistillConfig(epochs=1), Precision.BF16)   # in place

The refit fits each layer on its own, in forward order, to the parents' mean output there: a greedy fit whose
errors add up with depth, and which no later layer can undo. Parties that saw different data disagree most, so
their fusion loses most to their ensemble. Distillation (as FedDF does at a federated server) trains the whole fused
model end to end, with SGD, towards the classifier's refit target: per class, the parents' logits weighted as the
refit's classifier weighs them (`--head`, `--weights`), or the log of their so weighted mean probabilities
(`--head-probs`). No labels: the fuser reads only images, as for every other stage, and a public set works too.

Lengths are in passes over the fusion images (`epochs`, fractions allowed); the schedule is otfuse train's (a linear
warm-up from lr/10, then a linear decay to zero), SGD with Nesterov momentum, weight decay on weights only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn
from tqdm import tqdm

from otfuse.data import batches
from otfuse.errors import OtfuseError
from otfuse.optim import lr_at, make_optimizer
from otfuse.precision import Precision, autocast, channels_last

AUTO = -1.0  # --distill-epochs -1: decided by the parents' data (`passes`)


@dataclass
class DistillConfig:
    FLAG_PREFIX: ClassVar[str] = "distill"
    epochs: float = AUTO  # passes over the fusion images towards the parents' target (0: off; -1: one if their class counts differ)
    lr: float = 0.05  # peak SGD learning rate
    warmup: float = 0.1  # fraction of the steps spent warming up linearly from lr/10 to lr
    batch_size: int = 256  # images per optimiser step
    temperature: float = 1.0  # softmax temperature of the target and the fused model (the loss is scaled by its square)
    augment: bool = False  # the dataset's random crops and flips on every batch (for models trained with them)
    seed: int = 0  # batch order and augmentation
    optimizer: ClassVar[str] = "sgd"
    momentum: ClassVar[float] = 0.9
    weight_decay: ClassVar[float] = 5e-4

    def check(self) -> None:
        bad = [
            (self.epochs == AUTO or 0 <= self.epochs <= 1000, "--distill-epochs", "-1 (auto), or from 0 (off) to 1000"),
            (0 < self.lr <= 100, "--distill-lr", "a positive number, at most 100"),
            (0 <= self.warmup <= 1, "--distill-warmup", "between 0 and 1 (a fraction of the steps)"),
            (self.batch_size >= 2, "--distill-batch-size", "at least 2 (BatchNorm needs two images a batch)"),
            (0 < self.temperature <= 1000, "--distill-temperature", "a positive number, at most 1000"),
        ]
        for ok, flag, want in bad:
            if not ok:
                raise OtfuseError(f"{flag} {getattr(self, flag[len('--distill-') :].replace('-', '_'))} must be {want}")


def passes(cfg: DistillConfig, class_counts: torch.Tensor | None) -> float:
    """The passes `cfg` asks for; with AUTO, one where the parents' class counts ([parents, classes]) differ: parties
    of different data, whose ensemble is far above each of them, and none for parents of the same data (or of
    unknown data), where a parent trained as long beats a fused model trained on (docs/measurements.md)."""
    if cfg.epochs != AUTO:
        return cfg.epochs
    return 1.0 if class_counts is not None and len(class_counts) > 1 and not bool((class_counts == class_counts[0]).all()) else 0.0


def target_probs(teacher_logits: list[torch.Tensor], weights: torch.Tensor, temperature: float, probs: bool) -> torch.Tensor:
    """[batch, classes] target probabilities from K teachers' logits and `weights` ([K] per teacher, or [K, classes]
    per teacher and class, each class's column summing to one): the softmax of the weighted logits, or with `probs`
    the teachers' weighted mean probabilities, renormalised per image (a per-class weighting leaves them unnormalised)."""
    w = weights.to(teacher_logits[0].device, torch.float32)
    w = w[:, None, None] if w.ndim == 1 else w[:, None, :]
    z = torch.stack([t.float() / temperature for t in teacher_logits])
    if not probs:
        return (w * z).sum(0).softmax(-1)
    p = (w * z.softmax(-1)).sum(0)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


def distill_loss(out: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of `out` (logits) at `temperature` to `target` probabilities (KL up to a constant), scaled by the
    temperature's square so that its gradients keep their size whatever the temperature."""
    return nn.functional.cross_entropy(out.float() / temperature, target) * temperature**2


def steps_of(epochs: float, batch_size: int, n_images: int) -> int:
    """Optimiser steps of `epochs` passes over `n_images` images in batches of `batch_size` (whole batches; at least
    one when on)."""
    return 0 if epochs == 0 else max(1, math.ceil(epochs * (n_images // batch_size)))


def distill(
    fused: nn.Module,
    parents: list[nn.Module],
    weights: list[float],
    images: torch.Tensor,
    norm: tuple,
    cfg: DistillConfig,
    precision: Precision,
    head: torch.Tensor | None = None,
    head_probs: bool = False,
    progress: bool = False,
) -> nn.Module:
    """Train `fused` in place for `cfg.epochs` passes over the uint8 `images` towards the parents' target (module
    docstring): per class, `head` ([parents, classes]) where given, else `weights`. `fuse()` resolves AUTO
    (`passes`); here it trains nothing. Returns `fused` in eval mode."""
    cfg.check()
    if cfg.epochs <= 0:
        return fused.eval()
    if len(images) < 2:
        raise OtfuseError(f"--distill-epochs {cfg.epochs:g} trains on batches of two images or more, but the fusion reads {len(images)}")
    cfg = replace(cfg, batch_size=min(cfg.batch_size, len(images)))  # fewer images than a batch: one batch of them all
    dev = next(fused.parameters()).device
    w = head if head is not None else torch.tensor(weights)
    for p in parents:
        p.eval()
    opt = make_optimizer(fused, cfg)
    total = steps_of(cfg.epochs, cfg.batch_size, len(images))
    per_epoch = len(images) // cfg.batch_size
    bar = tqdm(total=total, desc="distil", disable=True if not progress else None, leave=False)
    step = 0
    with torch.enable_grad():
        fused.train()
        for epoch in range(math.ceil(total / per_epoch)):
            for xb, _ in batches(images, None, cfg.batch_size, norm, augment=cfg.augment, seed=cfg.seed, epoch=epoch, drop_last=True):
                if step == total:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, cfg)
                xb = channels_last(xb.to(dev), precision)
                with autocast(precision, dev):
                    with torch.no_grad():
                        target = target_probs([p(xb) for p in parents], w, cfg.temperature, head_probs)
                    loss = distill_loss(fused(xb), target, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update()
    bar.close()
    return fused.eval()
