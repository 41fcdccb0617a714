"""BatchNorm statistics recomputed on training data after the weights changed under them."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from otfuse.data import fixed_sample, image_batches


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, images: torch.Tensor, norm: tuple, n_batches: int = 100, batch_size: int = 128,
                 seed: int = 0, progress: bool = False, augment: bool = False) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative average over
    `n_batches` shuffled batches of `images` (unaugmented, or with training's crops and flips), in
    place; returns the model in eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or n_batches <= 0:
        return model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    dev = next(model.parameters()).device
    it = image_batches(images, batch_size, norm, seed=seed, drop_last=len(images) >= batch_size, augment=augment)
    done = 0
    with tqdm(total=n_batches, desc="batchnorm", disable=True if not progress else None, leave=False) as bar:
        while done < n_batches:
            for xb in it:
                model(xb.to(dev))
                done += 1
                bar.update()
                if done == n_batches:
                    break
            # fewer images than n_batches * batch_size: go round again in a new order
            it = image_batches(images, batch_size, norm, seed=seed, epoch=done, augment=augment)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


@torch.no_grad()
def channel_moments(model: nn.Module, points: list, images: torch.Tensor, norm: tuple, n_images: int = 1000,
                    batch_size: int = 250, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation at each Observation (a module's input or output), on a fixed
    sample of unaugmented images; streamed, only running sums are kept."""
    from otfuse.align import channel_rows

    sums = [[0.0, 0.0, 0] for _ in points]
    handles = []
    for k, p in enumerate(points):
        def add(x, k=k, p=p):
            rows = channel_rows(x.detach(), p.index).double()
            s = sums[k]
            s[0], s[1], s[2] = s[0] + rows.sum(1), s[1] + (rows * rows).sum(1), s[2] + rows.shape[1]
        mod = model.get_submodule(p.module)
        if getattr(p, "on", "output") == "input":
            handles.append(mod.register_forward_pre_hook(lambda _m, inputs, add=add: add(inputs[0])))
        else:
            handles.append(mod.register_forward_hook(lambda _m, _i, out, add=add: add(out)))
    model.eval()
    dev = next(model.parameters()).device
    sample = fixed_sample(images, n_images, seed)
    try:
        for xb in image_batches(sample, batch_size, norm):
            model(xb.to(dev))
    finally:
        for h in handles:
            h.remove()
    out = []
    for s1, s2, cnt in sums:
        mean = s1 / cnt
        out.append((mean, (s2 / cnt - mean * mean).clamp_min(0).sqrt()))
    return out


@torch.no_grad()
def repair(fused: nn.Module, parents: list[nn.Module], weights: list[float], groups: list, images: torch.Tensor,
           norm: tuple, n_images: int = 1000, seed: int = 0) -> nn.Module:
    """REPAIR-style renormalisation, in place: at every group's norm outputs (or producer outputs where
    there is no norm), give each fused channel the weighted mean of the aligned parents' activation
    mean and standard deviation, folded into that layer's affine parameters (the architecture stays)."""
    points = [p for g in groups for p in g.pre_observations]
    target = [(sum(w * m for w, (m, _) in zip(weights, ms)), sum(w * s for w, (_, s) in zip(weights, ms)))
              for ms in zip(*(channel_moments(p, points, images, norm, n_images, seed=seed) for p in parents))]
    current = channel_moments(fused, points, images, norm, n_images, seed=seed)
    for p, (mu_t, sd_t), (mu_f, sd_f) in zip(points, target, current):
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
