"""Logits, accuracy and loss of a model on uint8 data, in the precision asked for.

acc = accuracy(model, data.test_x, data.test_y, data.norm, Precision.BF16)
"""

from __future__ import annotations

import torch
from torch import nn

from otfuse.data import image_batches
from otfuse.precision import Precision, autocast, channels_last, full_float32

EVAL_BATCH = 250  # images per forward pass: fastest on CPUs of the size here (L2-resident), fine on a GPU


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor, norm: tuple, precision: Precision, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Float32 logits of every image of `x`, on the model's device, the forward passes in `precision` (fp32 or bf16)."""
    model.eval()
    dev = next(model.parameters()).device
    with full_float32(), autocast(precision, dev):  # whatever bf16 leaves in float32 is float32, not TF32
        out = [model(channels_last(xb.to(dev), precision)).float() for xb in image_batches(x, batch_size, norm)]
    return torch.cat(out)


def accuracy_of_logits(z: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (z.argmax(1) == y.to(z.device)).float().mean().item()


def task_accuracy_of_logits(z: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...] | list[int] | None) -> float:
    """Accuracy (%) on the images whose label is in `classes`, the argmax taken within `classes` (a party's own task);
    every image and class where `classes` is None."""
    if classes is None:
        return accuracy_of_logits(z, y)
    idx = torch.tensor(list(classes), device=z.device)
    y = y.to(z.device)
    keep = torch.isin(y, idx)
    if not bool(keep.any()):
        return float("nan")
    return 100.0 * (idx[z[keep][:, idx].argmax(1)] == y[keep]).float().mean().item()


def ensemble_of_logits(zs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The weighted mean of the models' softmax outputs: the ensemble's predictions (argmax as for logits)."""
    return sum(w * z.softmax(1) for w, z in zip(weights, zs))


def agreement(z: torch.Tensor, w: torch.Tensor) -> float:
    """How often two sets of logits predict the same class, in percent."""
    return 100.0 * (z.argmax(1) == w.argmax(1).to(z.device)).float().mean().item()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: tuple, precision: Precision) -> float:
    """Top-1 accuracy in percent."""
    return accuracy_of_logits(logits(model, x, norm, precision=precision), y)


def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: tuple, precision: Precision) -> tuple[float, float]:
    z = logits(model, x, norm, precision=precision)
    return torch.nn.functional.cross_entropy(z, y.to(z.device)).item(), accuracy_of_logits(z, y)
