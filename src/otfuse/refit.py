"""Refit the averaged model layer by layer, so each layer reproduces its parents' mean output.

    from otfuse.refit import RefitConfig, refit
    refit(fused, aligned_parents, [0.5, 0.5], data.train_x, data.norm, RefitConfig(), Precision.BF16)   # in place

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

One pass per model: each parent runs its forward pass over each batch once, one after another, and
its outputs at every unit (at the chosen positions) are added, weighted, into one target per unit
and batch, so memory holds those sums whatever the number of parents, not K parents' activations.
The fused model runs its forward pass over each batch once, in a thread of its own that pauses at
every unit, so the fit of unit L reads the fused model's inputs at L batch by batch, then writes L
before the fused model's passes go on; no prefix of the network is run twice. The fit reads at
most `max_rows` output positions per layer (the same random positions for every model): on the
width-64 ResNet18 the default 65,536 gave the same validation accuracy as all 1,048,576 positions
of the first stage, in half the time (docs/speed.md).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from scipy.linalg import blas
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from otfuse.data import augment_batch, fixed_sample, normalize
from otfuse.errors import OtfuseError
from otfuse.hooks import tapping
from otfuse.maps import ChannelMap, carry_outputs
from otfuse.precision import Precision, autocast, channels_last, full_float32

_BN = nn.modules.batchnorm._BatchNorm
CHUNK_ELEMENTS = 1 << 25  # unfolded input entries per Gram product (128 MiB of float32): bounds the refit's peak memory


@dataclass
class RefitConfig:
    FLAG_PREFIX: ClassVar[str] = "refit"
    enabled: bool = True  # refit each conv/linear layer by least squares to the parents' mean output (otfuse.refit)
    ridge: float = 0.01  # pull towards the parents' averaged layers (BatchNorm folded in), relative to the inputs' scale
    n_images: int = 1000  # training images (no labels) the layers are refit on
    augment: bool = False  # refit on crop+flip versions of those images (for models trained with them)
    max_rows: int = 65536  # output positions per layer fitted at most (the same random subset per image for every model); 0: all
    batch_size: int = 250  # images per forward pass
    seed: int = 0  # image sample, augmentation and position subsets

    def check(self) -> None:
        if not 0 <= self.ridge <= 1e6:  # at 1e6 the fit is already the parents' averaged layer: a larger one only overflows
            raise OtfuseError(f"--refit-ridge {self.ridge} must be from 0 to 1e6")
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


@full_float32()
def refit_sets_every_batchnorm(model: nn.Module, images: torch.Tensor, norm: tuple) -> bool:
    """Whether every BatchNorm of `model` follows a refit layer directly, so that the refit sets all their
    statistics (and recomputing them before it changes nothing). `images`: one or two uint8 examples."""
    dev = next(model.parameters()).device
    covered = {bn for _, bn in units(model, normalize(images, norm).to(dev)) if bn is not None}
    return all(name in covered for name, m in model.named_modules() if isinstance(m, _BN))


def _refittable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"


def _groups(m: nn.Module) -> int:
    """How many independent blocks the layer's map has (a grouped conv's groups; 1 otherwise)."""
    return m.groups if isinstance(m, nn.Conv2d) else 1


def _input_rows(layer: nn.Module, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """(images x chosen positions, fan-in): each chosen output position's receptive field, as the layer's
    weight sees it (a conv's in (channel, row, column) order), gathered straight from a strided view of
    the padded input: only the chosen positions are ever copied (idx None: every position)."""
    n = x.shape[0]
    if isinstance(layer, nn.Linear):
        rows = x.reshape(n, -1, x.shape[-1])
        return _pick(rows, idx)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    c, hp, wp = xp.shape[1:]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    sn, sc, sy, sx = xp.stride()
    view = xp.as_strided((n, ho, wo, c, kh, kw), (sn, sh * sy, sw * sx, sc, dh * sy, dw * sx))
    if idx is None:
        return view.reshape(n * ho * wo, c * kh * kw)
    image = torch.arange(n, device=x.device)[:, None].expand_as(idx)
    return view[image, idx // wo, idx % wo].reshape(-1, c * kh * kw)


def _output_rows(y: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(images, positions, channels) of a layer's or BatchNorm's output (channels on axis 1, or last for Linear):
    a view wherever the layout allows (a channels_last activation is one already)."""
    if y.ndim <= 2 or channels_last:
        return y.reshape(y.shape[0], -1, y.shape[-1])
    return y.movedim(1, -1).reshape(y.shape[0], -1, y.shape[1])


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
    _write_weight(m, layer, w.reshape(m.weight.shape).to(m.weight))
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


def _write_weight(m: nn.Module, layer: str, w: torch.Tensor) -> None:
    """Set a layer's weight; a parametrised one through its right inverse, checked to give back `w`."""
    if not parametrize.is_parametrized(m, "weight"):
        m.weight.copy_(w)
        return
    try:
        m.weight = w
    except Exception as exc:
        raise OtfuseError(
            f"the refit cannot write module {layer}'s parametrised weight ({type(exc).__name__}: {exc}); fuse with --no-refit"
        ) from None
    if not torch.allclose(m.weight, w, rtol=1e-4, atol=1e-6 * float(w.abs().max())):
        raise OtfuseError(
            f"the refit cannot write module {layer}'s parametrised weight: its parametrisation does not give back "
            "the fitted weight (spectral norm rescales it); fuse with --no-refit"
        )


def _batches(sample: torch.Tensor, norm: tuple, cfg: RefitConfig, device: torch.device) -> list[torch.Tensor]:
    """The refit's batches, the same for every model (augmented with a fixed draw where asked), as uint8 slices."""
    out = []
    for i, start in enumerate(range(0, len(sample), cfg.batch_size)):
        xb = sample[start : start + cfg.batch_size]
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


class _Stopped(Exception):
    """Raised inside a stream's forward pass when the refit needs nothing more from it."""


_DONE = object()


class _Stream:
    """One model's forward pass over one batch, in a thread of its own, paused at each tap until the
    refit takes the tensor the tap produced (transformed by `transform(key, tensor)`). Only one
    thread computes at a time: the main thread waits while a stream runs, and the stream waits
    while the main thread fits. So each batch's forward pass runs once, and no layer's inputs or
    targets are held longer than the fit that reads them."""

    def __init__(self, model: nn.Module, x: torch.Tensor, taps: list[tuple[int, str, str]], transform, precision: Precision):
        self.model, self.x, self.taps, self.transform, self.precision = model, x, taps, transform, precision
        self.items: queue.Queue = queue.Queue()
        self.go = threading.Semaphore(0)
        self.stash: dict[int, torch.Tensor] = {}
        self.state = "new"  # new | paused (a tap is waiting for go) | done
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fired: set[int] = set()

        def tap(key: int):
            def fn(t: torch.Tensor) -> None:
                if key in fired:  # a layer called twice is refit at its first call
                    return
                fired.add(key)
                with torch.autocast(self.x.device.type, enabled=False):  # the targets' arithmetic in full precision
                    value = self.transform(key, t)
                self.items.put((key, value))
                self.go.acquire()
                if self.stop:
                    raise _Stopped

            return fn

        try:
            with (
                torch.no_grad(),
                autocast(self.precision, self.x.device),
                tapping(self.model, [(name, where, tap(key)) for key, name, where in self.taps]),
            ):
                self.model(channels_last(self.x, self.precision))
        except _Stopped:
            pass
        except BaseException as exc:  # re-raised in the main thread by take()
            self.items.put((_DONE, exc))
            return
        self.items.put((_DONE, None))

    def take(self, key: int) -> torch.Tensor:
        """The tensor of tap `key`, running the forward pass on until it is produced."""
        while key not in self.stash:
            if self.state == "done":
                raise OtfuseError(f"module {self.taps[key][1]} is not reached by the forward pass; it cannot be refit")
            if self.state == "new":
                self.thread.start()
            else:
                self.go.release()
            k, value = self.items.get()
            if k is _DONE:
                self.state = "done"
                if value is not None:
                    raise value
                continue
            self.state = "paused"
            self.stash[k] = value
        return self.stash.pop(key)

    def close(self) -> None:
        self.stop = True
        if self.state == "paused":
            self.go.release()
        if self.state != "new":
            self.thread.join()


def _summed_targets(
    teachers: list[tuple[nn.Module, dict]],
    raw: list[torch.Tensor],
    taps: list[tuple[int, str, str]],
    target_of,
    unit_weights: list[list],
    probs: set[int],
    precision: Precision,
) -> list[list[torch.Tensor | None]]:
    """[unit][batch]: each unit's target, the teachers' outputs there (picked and carried by `target_of(carried,
    batch)`) weighted by `unit_weights[unit]` and summed, softmax outputs for the units in `probs`. One teacher's
    forward pass of one batch at a time, added as it goes: memory holds the sums, whatever the number of parents."""
    sums: list[list[torch.Tensor | None]] = [[None] * len(raw) for _ in taps]
    for p, (model, carried) in enumerate(teachers):
        for bi, xb in enumerate(raw):
            for ui, rows in _unit_outputs(model, xb, taps, target_of(carried, bi), precision).items():
                term = unit_weights[ui][p] * (rows.softmax(-1) if ui in probs else rows)
                sums[ui][bi] = term if sums[ui][bi] is None else sums[ui][bi].add_(term)
    return sums


def _unit_outputs(model: nn.Module, x: torch.Tensor, taps: list[tuple[int, str, str]], transform, precision: Precision) -> dict:
    """{tap: transform(tap, tensor)} of one forward pass over `x`, each tap at its module's first call."""
    out: dict[int, torch.Tensor] = {}

    def tap(key: int):
        def fn(t: torch.Tensor) -> None:
            if key not in out:  # a layer called twice is refit at its first call
                with torch.autocast(x.device.type, enabled=False):  # the targets' arithmetic in full precision
                    out[key] = transform(key, t)

        return fn

    with torch.no_grad(), autocast(precision, x.device), tapping(model, [(name, where, tap(key)) for key, name, where in taps]):
        model(channels_last(x, precision))
    missing = [name for key, name, _ in taps if key not in out]
    if missing:
        raise OtfuseError(f"module {missing[0]} is not reached by the forward pass; it cannot be refit")
    return out


def _gram(x: torch.Tensor) -> torch.Tensor:
    """(blocks, k, k) float64 sums of x^T x over the rows of x (rows, blocks, k): on the CPU only the upper
    triangle (BLAS's symmetric rank-k update, half the products of a matmul; `_symmetric` completes the
    sum once), elsewhere the whole of it (a batched matmul)."""
    if x.device.type != "cpu":
        return torch.einsum("rgi,rgj->gij", x, x).double()
    # (k, rows) per block: Fortran-ordered, so BLAS reads it in place, when x has one block
    return torch.stack([torch.from_numpy(blas.ssyrk(1.0, x[:, b, :].numpy().T, trans=0, lower=0)) for b in range(x.shape[1])]).double()


def _symmetric(gram: torch.Tensor) -> torch.Tensor:
    """The full matrices of sums of `_gram` results (upper triangles on the CPU)."""
    if gram.device.type != "cpu":
        return gram
    upper = gram.triu()
    return upper + upper.triu(1).transpose(1, 2)


def _fan_in(layer: nn.Module) -> int:
    """Entries of one input row (receptive field) of a conv or linear layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]


def _accumulate(layer: nn.Module, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor | None, sums: list) -> None:
    """Add one batch's second moments to `sums` = [gram, cross] of the rows with a constant 1 appended
    (the intercept), from the layer's inputs `x` and its picked targets `t`, a few images at a time:
    the receptive fields of a whole batch need not fit in memory at once."""
    g, n = _groups(layer), len(x)
    t = t.reshape(n, -1, t.shape[-1])
    step = max(1, CHUNK_ELEMENTS // (t.shape[1] * _fan_in(layer)))
    for i0 in range(0, n, step):
        xi = _input_rows(layer, x[i0 : i0 + step], None if idx is None else idx[i0 : i0 + step]).float()
        xi = xi.reshape(len(xi), g, -1)
        ti = t[i0 : i0 + step].reshape(len(xi), g, -1)
        # products in single precision (the big part), sums over chunks in double; the intercept's
        # row and column are the sums of the inputs and targets, not a column of ones multiplied out
        k, sx, st = xi.shape[2], xi.sum(0).double(), ti.sum(0).double()
        gram = torch.zeros(g, k + 1, k + 1, dtype=torch.float64, device=x.device)
        gram[:, :k, :k] = _gram(xi)
        gram[:, :k, k], gram[:, k, :k], gram[:, k, k] = sx, sx, float(len(xi))
        if g == 1:  # a plain matmul reads the transposed operand in place; einsum would copy it
            products = (xi[:, 0, :].T @ ti[:, 0, :])[None]
        else:
            products = torch.einsum("rgi,rgo->gio", xi, ti)
        cross = torch.cat([products.double(), st[:, None, :]], 1)
        sums[0] = gram if sums[0] is None else sums[0] + gram
        sums[1] = cross if sums[1] is None else sums[1] + cross


def _per_output(w: float | torch.Tensor) -> float | torch.Tensor:
    """A parent's weight as a factor of its unit's rows: a number, or one weight per output channel (the classifier
    weighted per class)."""
    return w[:, None].cpu() if isinstance(w, torch.Tensor) else w


def _solve(
    fused: nn.Module,
    parents: list[nn.Module],
    weights: list[float | torch.Tensor],
    layer: str,
    bn: str | None,
    gram: torch.Tensor,
    cross: torch.Tensor,
    ridge: float,
) -> None:
    """Ridge least squares of one unit, pulled towards the parents' averaged unit, written into `fused`."""
    mod = fused.get_submodule(layer)
    g = _groups(mod)
    # the anchor: the parents' units averaged with BatchNorm folded in, exact for a permuted copy
    anchor = sum(_per_output(w) * _unit_map(p, layer, bn) for w, p in zip(weights, parents)).reshape(g, -1, gram.shape[-1]).to(gram.device)
    n = gram.shape[-1]
    k = n if bn is not None or mod.bias is not None else n - 1  # no bias to hold an intercept
    lam = ridge * gram.diagonal(dim1=1, dim2=2)[:, :k].mean(1)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    lhs = gram[:, :k, :k] + lam[:, None, None] * eye
    rhs = cross[:, :k] + lam[:, None, None] * anchor[:, :, :k].transpose(1, 2)
    factor, info = torch.linalg.cholesky_ex(lhs)  # symmetric positive definite with a ridge: half the work of LU
    try:
        fit = (torch.cholesky_solve(rhs, factor) if not info.any() else torch.linalg.solve(lhs, rhs)).transpose(1, 2)
    except RuntimeError:  # torch.linalg.LinAlgError: singular without a ridge
        fit = None
    if fit is None or not torch.isfinite(fit).all():
        raise OtfuseError(
            f"the refit of layer {layer} is singular (its inputs are linearly dependent on these images, "
            f"ridge {ridge:g}); give --refit-ridge above 0 or --no-refit"
        )
    if k < n:
        fit = torch.cat([fit, torch.zeros_like(fit[:, :, :1])], 2)
    _set_unit(fused, layer, bn, fit.reshape(-1, n).to(mod.weight.device), gram.to(mod.weight.device))


@torch.no_grad()
@full_float32()  # the targets, Gram matrices and solves are float32/float64: never TF32
def refit(
    fused: nn.Module,
    parents: list[nn.Module],
    weights: list[float],
    images: torch.Tensor,
    norm: tuple,
    cfg: RefitConfig,
    precision: Precision,
    progress: bool = False,
    sources: list[tuple[nn.Module, dict[str, list[tuple[torch.Tensor, ChannelMap]]]]] | None = None,
    layers: set[str] | None = None,
    head: torch.Tensor | None = None,
    head_probs: bool = False,
) -> nn.Module:
    """Refit every conv/linear unit of `fused` in place, in forward order (see the module docstring).

    `parents` must already be carried onto the fused model's channels: their averaged units are the
    ridge's anchor. The targets are their outputs, or, with `sources`, each original parent's outputs
    carried through its maps ((model, `otfuse.maps.output_maps(...)`) per parent): the same for
    permutations, and the exact features to merge where a map merges or splits channels. The ridge
    is relative to the mean diagonal of the inputs' second-moment matrix. Forward passes run in
    `precision`; the products, sums and solves in float32/float64. With `layers`, only those units are refit
    (the others keep their weights). With `head` ([parents, classes]), the classifier (the last Linear unit with one
    output per class) is fit to each class's logit weighted per parent by `head[:, class]` instead of `weights`; with
    `head_probs`, to the log of the parents' (so weighted) mean probabilities, centred per image: parents whose logits
    differ in scale then count by what they predict, not by how loudly. Returns `fused` in eval mode."""
    dev = next(fused.parameters()).device
    fused.eval()
    teachers = sources or [(p, {}) for p in parents]
    for m, _ in teachers + [(p, {}) for p in parents]:
        m.eval()
    sample = fixed_sample(images, cfg.n_images, cfg.seed)
    todo = [u for u in units(fused, normalize(sample[:2], norm).to(dev)) if layers is None or u[0] in layers]
    raw = [normalize(xb.to(dev), norm) for xb in _batches(sample, norm, cfg, dev)]
    linear_out = {layer: bn is None and isinstance(fused.get_submodule(layer), nn.Linear) for layer, bn in todo}
    chosen: dict[tuple[int, int], torch.Tensor | None] = {}

    def positions(ui: int, bi: int, rows: torch.Tensor) -> torch.Tensor | None:
        if (ui, bi) not in chosen:  # the same positions for every parent and for the fused model's inputs
            per_image = -(-cfg.max_rows // len(sample)) if cfg.max_rows else rows.shape[1]
            chosen[ui, bi] = _positions(rows.shape[0], rows.shape[1], per_image, cfg.seed * 7919 + ui * 104_729 + bi, dev)
        return chosen[ui, bi]

    def target_of(carried: dict, bi: int):
        def fn(ui: int, y: torch.Tensor) -> torch.Tensor:
            layer = todo[ui][0]
            rows = _output_rows(y, linear_out[layer])
            idx = positions(ui, bi, rows)
            if idx is not None:  # the chosen positions first: carrying acts on channels, and fewer rows are cheaper
                rows = rows.gather(1, idx[:, :, None].expand(-1, -1, rows.shape[2]))
            rows = rows.float()
            if layer in carried:
                rows = carry_outputs(rows, 2, carried[layer])
            return rows.reshape(-1, rows.shape[2])

        return fn

    def parent_weights(ui: int) -> list:
        layer = todo[ui][0]
        if head is not None and classifier(ui) and fused.get_submodule(layer).out_features == head.shape[1]:
            return list(head.to(dev, torch.float32))
        return weights

    def classifier(ui: int) -> bool:
        return ui == len(todo) - 1 and linear_out[todo[ui][0]]

    target_taps = [(ui, bn or layer, "output") for ui, (layer, bn) in enumerate(todo)]
    input_taps = [(ui, layer, "input") for ui, (layer, _) in enumerate(todo)]
    unit_weights = [parent_weights(ui) for ui in range(len(todo))]
    probs = {ui for ui in range(len(todo)) if classifier(ui) and head_probs}
    targets = _summed_targets(teachers, raw, target_taps, target_of, unit_weights, probs, precision)
    inputs = [_Stream(fused, xb, input_taps, lambda _k, x: x, precision) for xb in raw]
    try:
        for ui, (layer, bn) in enumerate(tqdm(todo, desc="refit", disable=True if not progress else None, leave=False)):
            mod = fused.get_submodule(layer)
            sums: list = [None, None]
            for bi in range(len(raw)):
                t = targets[ui][bi]
                targets[ui][bi] = None  # each target is read once: freed as soon as it is
                if ui in probs:
                    t = t.clamp_min(1e-12).log()
                    t = t - t.mean(-1, keepdim=True)
                x = inputs[bi].take(ui)
                _accumulate(mod, x, t, chosen.get((ui, bi)), sums)
            _solve(fused, parents, unit_weights[ui], layer, bn, _symmetric(sums[0]), sums[1], cfg.ridge)
    finally:
        for s in inputs:
            s.close()
    return fused.eval()
