"""Neuron transplantation: the parents placed side by side in one model n times as wide (exactly their
ensemble), then pruned back to one parent's width by Torch-Pruning's magnitude pruner. A start for
fine-tuning, not a gradient-free fusion: the pruned model keeps each parent's strongest channels but
none of the connections between the two, which fine-tuning grows (after Oez et al., "Model Fusion
via Neuron Transplantation", 2025).

    from otfuse.transplant import side_by_side, transplant
    wide = side_by_side([a, b], model_from_meta(meta, 2 * width), images, norm)   # the mean of a's and b's logits
    start = transplant([a, b], model_from_meta(meta, 2 * width), model_from_meta(meta, width), images, norm, bn_cfg, Precision.BF16)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from otfuse.bn import BatchNormConfig, recompute_bn
from otfuse.data import normalize
from otfuse.errors import OtfuseError
from otfuse.evaluate import logits
from otfuse.grouping.adapter import magnitude_pruned
from otfuse.precision import Precision

SIDE_BY_SIDE_RTOL = 1e-3  # largest logit error, relative to the logits' scale, of a wide model taken for the ensemble


@torch.no_grad()
def side_by_side(models: list[nn.Module], wide: nn.Module, images: torch.Tensor, norm: tuple) -> nn.Module:
    """`wide` (the architecture at n times the models' width) loaded with the n `models` as disjoint blocks: every
    dimension that is n times the models' holds model i's channels in block i, connections between blocks are
    zero, and a layer whose output is not widened (the classifier) sums the blocks' contributions with weight
    1/n. Checked on `images`: it must compute the mean of the models' logits, or it is refused. Returns `wide`."""
    n = len(models)
    states = [m.state_dict() for m in models]
    merged = {}
    for key, t in wide.state_dict().items():
        parts = [s[key] for s in states]
        if parts[0].ndim != t.ndim:
            raise OtfuseError(f"cannot place these models side by side: {key} has {parts[0].ndim} dims, {t.ndim} when widened")
        dims = [d for d in range(t.ndim) if t.shape[d] == n * parts[0].shape[d] != parts[0].shape[d]]
        if not dims:
            merged[key] = sum(p.float() for p in parts).div(n).to(t.dtype) if t.is_floating_point() else parts[0].clone()
            continue
        out = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        shared_output = 0 not in dims  # the blocks write into the same outputs: their contributions add up
        for i, p in enumerate(parts):
            block = tuple(slice(i * p.shape[d], (i + 1) * p.shape[d]) if d in dims else slice(None) for d in range(t.ndim))
            out[block] = p.float() / n if shared_output else p.float()
        merged[key] = out.to(t.dtype)
    wide.load_state_dict(merged)
    wide.eval()
    x = images[:64]
    # an exactness check, so in float32 whatever the run's precision
    want = sum(logits(m.eval(), x, norm, Precision.FP32) for m in models) / n
    err = (logits(wide, x, norm, Precision.FP32) - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    if err > SIDE_BY_SIDE_RTOL:
        raise OtfuseError(
            f"this architecture cannot be widened into its models side by side (the wide model's logits differ from "
            f"the ensemble's by {err:.2g} of their scale); transplant needs a registry model whose width scales every channel"
        )
    return wide


def pruned(model: nn.Module, target: nn.Module, ratio: float, images: torch.Tensor, norm: tuple, p: int = 2) -> nn.Module:
    """`target` (the architecture at a smaller width) loaded with `model` pruned to it by Torch-Pruning's magnitude
    pruner: every channel group cut by the fraction `ratio`, the channels of least L`p` norm go; the classifier stays.
    `images` (two suffice) trace the model."""
    model = copy.deepcopy(model).float().cpu()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    magnitude_pruned(model, normalize(images[:2].cpu(), norm), ratio, p, ignored=[head])
    got, want = {k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in target.state_dict().items()}
    if got != want:
        bad = next(k for k in want if got.get(k) != want[k])
        raise OtfuseError(
            f"pruning does not give this architecture's narrower model ({bad}: {tuple(got.get(bad, ()))} against "
            f"{tuple(want[bad])}); prune a registry model whose width scales every channel"
        )
    target.load_state_dict(model.state_dict())
    return target


def transplant(
    models: list[nn.Module],
    wide: nn.Module,
    target: nn.Module,
    images: torch.Tensor,
    norm: tuple,
    bn: BatchNormConfig,
    precision: Precision,
    ratio: float | None = None,
) -> nn.Module:
    """The models side by side in `wide`, pruned to `target`'s width by magnitude (cutting the fraction `ratio` of
    every channel group; default 1 - 1/n, back to one model's width), BatchNorm statistics recomputed on `images`
    (the pruned channels' inputs changed); returns `target` in eval mode."""
    ratio = 1 - 1 / len(models) if ratio is None else ratio
    start = pruned(side_by_side(models, wide, images, norm), target, ratio, images, norm)
    return recompute_bn(start.to(images.device), images, norm, bn, precision=precision)
