"""Refit the averaged model layer by layer, so each layer reproduces its parents' mean output.

    from otfuse.refit import RefitConfig, refit
    refit(fused, aligned_parents, [0.5, 0.5], data.train_x, data.norm, RefitConfig())   # in place

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
Conv2d (zero padding; a grouped conv block by block) and Linear layers are refit; any other layer
keeps its average.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from otfuse.data import augment_batch, fixed_sample, normalize
from otfuse.errors import OtfuseError
from otfuse.hooks import tapped, tapping
from otfuse.maps import ChannelMap, carry_outputs

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class RefitConfig:
    FLAG_PREFIX: ClassVar[str] = "refit"
    enabled: bool = True  # refit each conv/linear layer by least squares to the parents' mean output (otfuse.refit)
    ridge: float = 0.01  # pull towards the parents' averaged layers (BatchNorm folded in), relative to the inputs' scale
    n_images: int = 1000  # training images (no labels) the layers are refit on
    augment: bool = False  # refit on crop+flip versions of those images (for models trained with them)
    max_rows: int = 0  # output positions per layer fitted at most (a random subset per image); 0: all
    batch_size: int = 250  # images per forward pass
    seed: int = 0  # image sample, augmentation and position subsets

    def check(self) -> None:
        if not (self.ridge >= 0 and self.ridge != float("inf")):
            raise OtfuseError(f"--refit-ridge {self.ridge} must be a finite number, at least 0")
        if self.n_images < 2:
            raise OtfuseError(f"--refit-n-images {self.n_images} is too small; use at least 2")
        if self.batch_size < 1:
            raise OtfuseError(f"--refit-batch-size {self.batch_size} must be at least 1")
        if self.max_rows < 0:
            raise OtfuseError(f"--refit-max-rows {self.max_rows} must be 0 (every position) or more")


def units(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str | None]]:
    """(layer, the BatchNorm fed directly by it or None) for every refittable layer, in forward order."""
    order: list[str] = []
    made: dict[int, tuple[str, torch.Tensor]] = {}  # holding the outputs keeps their memory from being reused
    norm_of: dict[str, str] = {}

    def record_layer(name: str):
        def fn(out: torch.Tensor) -> None:
            order.append(name)
            made[id(out)] = (name, out)
        return fn

    def record_norm(name: str):
        def fn(x: torch.Tensor) -> None:
            hit = made.get(id(x))
            if hit is not None and hit[1] is x:
                norm_of.setdefault(hit[0], name)
        return fn

    taps = [(n, "output", record_layer(n)) for n, m in model.named_modules() if _refittable(m)]
    taps += [(n, "input", record_norm(n)) for n, m in model.named_modules() if isinstance(m, _BN)]
    with torch.no_grad(), tapping(model, taps):
        model.eval()(example)
    seen, out = set(), []
    for name in order:  # a layer called twice is refit once, at its first call
        if name not in seen:
            seen.add(name)
            out.append((name, norm_of.get(name)))
    return out


def _refittable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"


def _groups(m: nn.Module) -> int:
    """How many independent blocks the layer's map has (a grouped conv's groups; 1 otherwise)."""
    return m.groups if isinstance(m, nn.Conv2d) else 1


def _input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(images, positions, fan-in): each output position's receptive field, as the layer's weight sees it."""
    if isinstance(layer, nn.Linear):
        return x.reshape(x.shape[0], -1, x.shape[-1])
    return F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)


def _output_rows(y: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(images, positions, channels) of a layer's or BatchNorm's output (channels on axis 1, or last for Linear)."""
    if y.ndim <= 2 or channels_last:
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.flatten(2).transpose(1, 2)


def _pick(rows: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(images x chosen positions, features): the rows at each image's chosen positions (all when idx is None)."""
    if idx is not None:
        rows = rows.gather(1, idx[:, :, None].expand(-1, -1, rows.shape[2]))
    return rows.reshape(-1, rows.shape[2])


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
    """Write the affine map `fit` (out, fan-in + 1) into the layer (and its BatchNorm, whose statistics
    become the refit layer's exact output mean and variance under the sample's second moments `gram`,
    (blocks, fan-in + 1, fan-in + 1): one per block of a grouped conv, each for its outputs)."""
    m = model.get_submodule(layer)
    w, b = fit[:, :-1], fit[:, -1]
    per_block = w.reshape(len(gram), -1, w.shape[1])
    m.weight.copy_(w.reshape(m.weight.shape).to(m.weight))
    if norm is None:
        if m.bias is not None:
            m.bias.copy_(b.to(m.bias))
        return
    if m.bias is not None:
        m.bias.zero_()
    n = model.get_submodule(norm)
    moments = gram / gram[:, -1:, -1:]  # E[x x^T] per block, with E[x] in the last column
    mean = torch.einsum("goi,gi->go", per_block, moments[:, :-1, -1]).reshape(-1)
    var = (torch.einsum("goi,gij,goj->go", per_block, moments[:, :-1, :-1], per_block).reshape(-1) - mean**2).clamp_min(0)
    n.running_mean.copy_(mean.to(n.running_mean))
    n.running_var.copy_(var.to(n.running_var))
    if n.affine:  # normalise, then undo it: the unit computes w x + b, and BatchNorm stays a true normaliser
        n.weight.copy_((var + n.eps).sqrt().to(n.weight))
        n.bias.copy_((mean + b).to(n.bias))


def _batches(sample: torch.Tensor, norm: tuple, cfg: RefitConfig, device: torch.device) -> list[torch.Tensor]:
    """The refit's batches, the same on every pass (augmented with a fixed draw where asked), as uint8 slices."""
    out = []
    for i, start in enumerate(range(0, len(sample), cfg.batch_size)):
        xb = sample[start:start + cfg.batch_size]
        if cfg.augment:
            xb = augment_batch(xb, torch.Generator().manual_seed(cfg.seed * 100_003 + i), max(1, xb.shape[-1] // 8))
        out.append(xb)
    return out


def _positions(n: int, length: int, keep: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """Per image, `keep` random positions out of `length` (None: keep all)."""
    if keep >= length:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, length, generator=gen).argsort(1)[:, :keep].to(device)


@torch.no_grad()
def refit(fused: nn.Module, parents: list[nn.Module], weights: list[float], images: torch.Tensor, norm: tuple,
          cfg: RefitConfig, progress: bool = False,
          sources: list[tuple[nn.Module, dict[str, list[tuple[torch.Tensor, ChannelMap]]]]] | None = None) -> nn.Module:
    """Refit every conv/linear unit of `fused` in place, in forward order (see the module docstring).

    `parents` must already be carried onto the fused model's channels: their averaged units are the
    ridge's anchor. The targets are their outputs, or, with `sources`, each original parent's outputs
    carried through its maps ((model, `otfuse.maps.output_maps(...)`) per parent): the same for
    permutations, and the exact features to merge where a map merges or splits channels. The ridge
    is relative to the mean diagonal of the inputs' second-moment matrix. Returns `fused` in eval mode."""
    dev = next(fused.parameters()).device
    fused.eval()
    for p in parents + [m for m, _ in sources or []]:
        p.eval()
    sample = fixed_sample(images, cfg.n_images, cfg.seed)
    todo = units(fused, normalize(sample[:2], norm).to(dev))
    raw = _batches(sample, norm, cfg, dev)
    # pass 1: the parents' weighted mean output of every unit, once, at each unit's chosen positions
    targets: dict[str, list[torch.Tensor]] = {layer: [] for layer, _ in todo}
    chosen: dict[str, list[torch.Tensor | None]] = {layer: [] for layer, _ in todo}
    for bi, xb in enumerate(tqdm(raw, desc="refit targets", disable=True if not progress else None, leave=False)):
        xb = normalize(xb.to(dev), norm)
        sums: dict[str, torch.Tensor] = {}

        def keep(layer: str, bn: str | None, ui: int, w: float, fired: set, carried: dict):
            def fn(y: torch.Tensor) -> None:
                if layer in fired:  # a layer called twice is refit at its first call
                    return
                fired.add(layer)
                rows = _output_rows(y.float(), bn is None and isinstance(fused.get_submodule(layer), nn.Linear))
                if layer in carried:
                    rows = carry_outputs(rows, 2, carried[layer])
                if len(chosen[layer]) == bi:  # the same positions for every parent
                    per_image = -(-cfg.max_rows // len(sample)) if cfg.max_rows else rows.shape[1]
                    chosen[layer].append(_positions(rows.shape[0], rows.shape[1], per_image, cfg.seed * 7919 + ui * 104_729 + bi, dev))
                picked = w * _pick(rows, chosen[layer][bi])
                sums[layer] = picked if layer not in sums else sums[layer] + picked
            return fn

        for w, (p, carried) in zip(weights, sources or [(p, {}) for p in parents]):
            fired: set = set()
            with tapping(p, [(bn or layer, "output", keep(layer, bn, ui, w, fired, carried)) for ui, (layer, bn) in enumerate(todo)]):
                p(xb)
        for layer in sums:
            targets[layer].append(sums[layer])
    # pass 2: each unit in forward order, fed the fused model's own (already refit) inputs
    for layer, bn in tqdm(todo, desc="refit", disable=True if not progress else None, leave=False):
        mod = fused.get_submodule(layer)
        g = _groups(mod)  # a grouped conv's blocks are independent least-squares problems, solved as a batch
        gram = cross = None
        for bi, xb in enumerate(raw):
            x = _pick(_input_rows(mod, tapped(fused, layer, "input", normalize(xb.to(dev), norm)).float()), chosen[layer][bi])
            x = torch.cat([x.reshape(len(x), g, -1), torch.ones_like(x[:, None, :1]).expand(-1, g, 1)], 2)  # rows, blocks, fan-in + 1
            t = targets[layer][bi].reshape(len(x), g, -1)
            # products in single precision (the big part), sums over batches in double
            gram = torch.einsum("rgi,rgj->gij", x, x).double() + (0 if gram is None else gram)
            cross = torch.einsum("rgi,rgo->gio", x, t).double() + (0 if cross is None else cross)
        targets[layer] = []  # free the memory as we go
        # the anchor: the parents' units averaged with BatchNorm folded in, exact for a permuted copy
        anchor = sum(w * _unit_map(p, layer, bn) for w, p in zip(weights, parents)).reshape(g, -1, gram.shape[-1])
        n = gram.shape[-1]
        k = n if bn is not None or mod.bias is not None else n - 1  # no bias to hold an intercept
        lam = cfg.ridge * gram.diagonal(dim1=1, dim2=2)[:, :k].mean(1)
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        fit = torch.linalg.solve(gram[:, :k, :k] + lam[:, None, None] * eye,
                                 cross[:, :k] + lam[:, None, None] * anchor[:, :, :k].transpose(1, 2)).transpose(1, 2)
        if k < n:
            fit = torch.cat([fit, torch.zeros_like(fit[:, :, :1])], 2)
        _set_unit(fused, layer, bn, fit.reshape(-1, n), gram)
    return fused
