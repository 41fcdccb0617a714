"""Logits, accuracy and loss of a model on uint8 data."""

from __future__ import annotations

import torch
from torch import nn

from otfuse.data import image_batches


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, norm: tuple, batch_size: int = 500) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = [model(xb.to(dev)).float() for xb in image_batches(x, batch_size, norm)]
    return torch.cat(out)


def accuracy_of_logits(z: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (z.argmax(1).cpu() == y.cpu()).float().mean().item()


def agreement(z: torch.Tensor, w: torch.Tensor) -> float:
    """How often two sets of logits predict the same class, in percent."""
    return 100.0 * (z.argmax(1).cpu() == w.argmax(1).cpu()).float().mean().item()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: tuple) -> float:
    """Top-1 accuracy in percent."""
    return accuracy_of_logits(logits(model, x, norm), y)


def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: tuple) -> tuple[float, float]:
    z = logits(model, x, norm)
    return torch.nn.functional.cross_entropy(z, y.to(z.device)).item(), accuracy_of_logits(z, y)
