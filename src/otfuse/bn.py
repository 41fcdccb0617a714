"""BatchNorm statistics recomputed on training data after the weights changed under them."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from otfuse.data import batches


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, images: torch.Tensor, norm: tuple, n_batches: int = 100, batch_size: int = 128,
                 seed: int = 0, progress: bool = False) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative average over
    `n_batches` shuffled, unaugmented batches of `images`, in place; returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches <= 0:
        return model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    dev = next(model.parameters()).device
    it = batches(images, torch.zeros(len(images), dtype=torch.long), batch_size, norm, seed=seed, drop_last=len(images) >= batch_size)
    done = 0
    with tqdm(total=n_batches, desc="batchnorm", disable=True if not progress else None, leave=False) as bar:
        while done < n_batches:
            for xb, _ in it:
                model(xb.to(dev))
                done += 1
                bar.update()
                if done == n_batches:
                    break
            # fewer images than n_batches * batch_size: go round again in a new order
            it = batches(images, torch.zeros(len(images), dtype=torch.long), batch_size, norm, seed=seed, epoch=done)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()
