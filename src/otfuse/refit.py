"""Refit the averaged model layer by layer, so each layer reproduces its parents' mean output.

    from otfuse.refit import refit
    refit(fused, aligned_parents, [0.5, 0.5], data.train_x, data.norm)   # in place

Averaging aligned weights is only right where the parents' layers are near-linear images of each
other; in narrow networks they are not, and the error compounds with depth. The refit fixes each
layer in forward order: on a fixed sample of unaugmented training images (no labels), the
layer's (with its BatchNorm, the "unit") affine map is refit by ridge least squares so that, fed
the fused model's own inputs, it outputs the weighted mean of the aligned parents' outputs of
that unit. The ridge pulls towards the weighted mean of the parents' units (BatchNorm folded
into each), so a layer the average already gets right is kept, and a model fused with a
permuted copy of itself is returned as it was.

It generalises REPAIR, which corrects only each channel's mean and standard deviation. The
architecture is unchanged: the fit is folded into the conv/linear weight and bias and the
following BatchNorm, whose statistics become the exact ones of the refit layer on the sample.
Conv2d (groups=1, zero padding) and Linear layers are refit; any other layer keeps its average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from otfuse.data import fixed_sample, image_batches

_BN = nn.modules.batchnorm._BatchNorm


class _Reached(Exception):
    """Raised by a hook once the wanted tensor is captured: the rest of the forward pass is not needed."""


def units(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str | None]]:
    """(layer, the BatchNorm fed directly by it or None) for every refittable layer, in forward order."""
    order: list[str] = []
    made: dict[int, tuple[str, torch.Tensor]] = {}  # holding the outputs keeps their memory from being reused
    norm_of: dict[str, str] = {}

    def record_layer(name):
        def fn(_m, _i, out):
            order.append(name)
            made[id(out)] = (name, out)
        return fn

    def record_norm(name):
        def fn(_m, inputs):
            hit = made.get(id(inputs[0]))
            if hit is not None and hit[1] is inputs[0]:
                norm_of.setdefault(hit[0], name)
        return fn

    handles = []
    for name, m in model.named_modules():
        if _refittable(m):
            handles.append(m.register_forward_hook(record_layer(name)))
        elif isinstance(m, _BN):
            handles.append(m.register_forward_pre_hook(record_norm(name)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    seen, out = set(), []
    for name in order:  # a layer called twice is refit once, at its first call
        if name not in seen:
            seen.add(name)
            out.append((name, norm_of.get(name)))
    return out


def _refittable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(positions, fan-in): each output position's receptive field, as the layer's weight sees it."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _output_rows(y: torch.Tensor) -> torch.Tensor:
    """(positions, channels) of a layer's or BatchNorm's output (channels on axis 1, or last for Linear)."""
    if y.ndim <= 2:
        return y.reshape(-1, y.shape[-1])
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _capture(model: nn.Module, module: str, xb: torch.Tensor, want: str, layer: nn.Module) -> torch.Tensor:
    """The rows `layer` reads at `module`'s input (want="in") or `module`'s output rows (want="out") on batch xb."""
    box = {}

    def take(_m, args, out=None):
        box["rows"] = _input_rows(layer, args[0]) if want == "in" else _output_rows(out)
        raise _Reached

    mod = model.get_submodule(module)
    h = mod.register_forward_pre_hook(take) if want == "in" else mod.register_forward_hook(take)
    try:
        model(xb)
    except _Reached:
        pass
    finally:
        h.remove()
    return box["rows"]


def _unit_map(model: nn.Module, layer: str, norm: str | None) -> torch.Tensor:
    """(out, fan-in + 1): the eval-mode affine map x -> norm(layer(x)), bias as the last column."""
    m = model.get_submodule(layer)
    w = m.weight.detach().reshape(m.weight.shape[0], -1).double()
    b = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if norm is not None:
        n = model.get_submodule(norm)
        g = (n.weight.detach().double() if n.affine else 1.0) / (n.running_var.double() + n.eps).sqrt()
        w, b = w * g[:, None], (b - n.running_mean.double()) * g + (n.bias.detach().double() if n.affine else 0.0)
    return torch.cat([w, b[:, None]], 1)


def _set_unit(model: nn.Module, layer: str, norm: str | None, fit: torch.Tensor, gram: torch.Tensor) -> None:
    """Write the affine map `fit` into the layer (and its BatchNorm, whose statistics become the
    refit layer's exact output mean and variance under the sample's `gram`)."""
    m = model.get_submodule(layer)
    w, b = fit[:, :-1], fit[:, -1]
    m.weight.copy_(w.reshape(m.weight.shape).to(m.weight))
    if norm is None:
        if m.bias is not None:
            m.bias.copy_(b.to(m.bias))
        return
    if m.bias is not None:
        m.bias.zero_()
    n = model.get_submodule(norm)
    count = gram[-1, -1]
    mean = w @ (gram[:-1, -1] / count)
    var = (((w @ (gram[:-1, :-1] / count)) * w).sum(1) - mean**2).clamp_min(0)
    n.running_mean.copy_(mean.to(n.running_mean))
    n.running_var.copy_(var.to(n.running_var))
    if n.affine:  # normalise, then undo it: the unit computes w x + b, and BatchNorm stays a true normaliser
        n.weight.copy_((var + n.eps).sqrt().to(n.weight))
        n.bias.copy_((mean + b).to(n.bias))


@torch.no_grad()
def refit(fused: nn.Module, parents: list[nn.Module], weights: list[float], images: torch.Tensor, norm: tuple,
          n_images: int = 1000, seed: int = 0, ridge: float = 1e-2, batch_size: int = 250,
          progress: bool = False) -> nn.Module:
    """Refit every conv/linear unit of `fused` in place, in forward order (see the module docstring);
    `parents` must already be aligned to it. `ridge` is relative to the mean diagonal of the inputs'
    second-moment matrix. Returns `fused` in eval mode."""
    dev = next(fused.parameters()).device
    fused.eval()
    for p in parents:
        p.eval()
    sample = fixed_sample(images, n_images, seed)
    example = next(image_batches(sample[:2], 2, norm)).to(dev)
    todo = units(fused, example)
    for layer, bn in tqdm(todo, desc="refit", disable=True if not progress else None, leave=False):
        mod = fused.get_submodule(layer)
        gram = cross = None
        for xb in image_batches(sample, batch_size, norm):
            xb = xb.to(dev)
            x = _capture(fused, layer, xb, "in", mod).float()
            x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            target = sum(w * _capture(p, bn or layer, xb, "out", mod).float() for w, p in zip(weights, parents))
            # products in single precision (the big part), sums over batches in double
            gram = (x.T @ x).double() + (0 if gram is None else gram)
            cross = (x.T @ target).double() + (0 if cross is None else cross)
        # the anchor: the parents' units averaged with BatchNorm folded in, exact for a permuted copy
        anchor = sum(w * _unit_map(p, layer, bn) for w, p in zip(weights, parents))
        k = len(gram) if bn is not None or mod.bias is not None else len(gram) - 1  # no bias to hold an intercept
        lam = ridge * gram.diagonal()[:k].mean()
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        fit = torch.linalg.solve(gram[:k, :k] + lam * eye, cross[:k] + lam * anchor[:, :k].T).T
        if k < len(gram):
            fit = torch.cat([fit, torch.zeros_like(fit[:, :1])], 1)
        _set_unit(fused, layer, bn, fit, gram)
    return fused
