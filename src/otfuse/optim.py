"""The optimiser and learning-rate schedule of every training loop: otfuse train, finetune, and the distillation stage.

opt = make_optimizer(model, cfg)                 # cfg: lr, weight_decay, optimizer, momentum
for g in opt.param_groups: g["lr"] = lr_at(step, total, cfg)   # cfg: lr, warmup
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Schedule(Protocol):
    lr: float  # peak learning rate
    warmup: float  # fraction of all steps spent warming up
    optimizer: str  # sgd | adamw
    momentum: float
    weight_decay: float


def lr_at(step: int, total: int, cfg: Schedule) -> float:
    """Linear warm-up from lr/10 to lr, then linear decay to zero (per optimiser step)."""
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (0.1 + 0.9 * step / warm)
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


def make_optimizer(model: nn.Module, cfg: Schedule) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW; weight decay on weights only."""
    # no weight decay on norm and bias parameters: decaying them only hurts
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    param_groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999))
    return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
