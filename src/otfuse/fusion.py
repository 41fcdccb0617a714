"""The fusion pipeline: align every model onto the first, average, recompute BatchNorm, then REPAIR and the refit.

    from otfuse import FuseConfig, fuse
    result = fuse([model_a, model_b], data.train_x, data.norm, FuseConfig())
    result.fused          # the fused model
    result.fused_average  # the aligned average with BatchNorm recomputed ("average only")
    result.columns()      # every model a fusion table reports, by its column: fused_no_bn, ..., vanilla_refit
    result.seconds        # {"groups": ..., "alignment": ..., "averaging": ..., "batchnorm": ..., "refit": ...}

`fuse` is the one owner of that sequence; the CLI, the fusion scripts, tune, interpolate and the
benches all call it. Its configuration is one `FuseConfig` holding one config per stage. Each model
it makes has one name: the `Fusion` field, the results column and the docs say `fused_no_bn`,
`fused_average`, `fused`, `fused_repair`, `vanilla`, `vanilla_bn` and `vanilla_refit`.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn

from otfuse.align import AlignConfig, align, to_target_maps
from otfuse.bn import BatchNormConfig, RepairConfig, recompute_bn, repair
from otfuse.distill import DistillConfig, distill, passes
from otfuse.errors import OtfuseError
from otfuse.grouping.exact import groups_of
from otfuse.grouping.group import ChannelGroup
from otfuse.maps import ChannelMap, carry, output_maps
from otfuse.precision import Precision, full_float32, resolve_precision
from otfuse.refit import RefitConfig, refit, refit_sets_every_batchnorm
from otfuse.subsets import check_fusion_data

HEADS = ("equal", "counts")
SIZES = "sizes"  # --weights sizes: each parent by its training images
AUTO = "auto"  # --weights auto: sizes where the parents' class counts are known, else equal


@dataclass
class FuseConfig:
    """Every option of a fusion: one config per stage, plus how the models are weighted."""

    STAGES: ClassVar[tuple[str, ...]] = ("align", "bn", "repair", "refit", "distill")
    align: AlignConfig = field(default_factory=AlignConfig)
    bn: BatchNormConfig = field(default_factory=BatchNormConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    weights: str = AUTO  # model weights of the average: comma-separated | empty: equal | sizes: training images | auto: sizes if known
    head: str = "counts"  # the refit classifier's target per class: counts (each parent by its share of the class) | equal (--weights)
    head_probs: bool = False  # the refit classifier's target: the log of the parents' mean probabilities (else their mean logits)
    fusion_data: str = "union"  # training images the stages read: union (of the parents' parts) | model<k> (its part) | <N>-per-class
    precision: str = "auto"  # forward passes: auto (bf16 autocast where the device has native bf16) | fp32 | bf16

    def check(self, n_models: int | None = None) -> None:
        for stage in self.STAGES:
            getattr(self, stage).check()
        resolve_precision(self.precision, torch.device("cpu"))
        if self.head not in HEADS:
            raise OtfuseError(f"--head {self.head!r}: choose {' or '.join(HEADS)}")
        check_fusion_data(self.fusion_data, n_models)
        if n_models is not None and self.weights not in (SIZES, AUTO):
            self.model_weights(n_models)

    def model_weights(self, k: int, sizes: list[float] | None = None) -> list[float]:
        """The averaging weights of k models, normalised to sum to one; with `--weights sizes`, the models' training
        image counts `sizes` (a parent whose counts are not known cannot be weighed so: one clear error); with `auto`
        (the default), those counts where they are given, else equal weights."""
        if not self.weights or (self.weights == AUTO and sizes is None):
            return [1.0 / k] * k
        if self.weights in (SIZES, AUTO):
            if sizes is None or len(sizes) != k or sum(sizes) <= 0:
                raise OtfuseError(
                    "--weights sizes weighs each parent by the training images it learnt from, which this fusion was not "
                    "given (fuse(..., class_counts=...), read from checkpoint metadata by the CLI); give numbers instead"
                )
            return _normalised([float(v) for v in sizes])
        try:
            w = [float(v) for v in self.weights.split(",")]
        except ValueError:
            raise OtfuseError(f"--weights {self.weights!r} must be comma-separated numbers or sizes") from None
        if len(w) != k or not all(math.isfinite(v) and v >= 0 for v in w) or sum(w) <= 0:
            raise OtfuseError(f"--weights {self.weights!r}: give {k} finite, non-negative numbers with a positive sum")
        return _normalised(w)


def _normalised(w: list[float]) -> list[float]:
    top = max(w)  # scaled first: a sum of huge weights overflows to inf (and every weight to 0), tiny ones underflow
    scaled = [v / top for v in w]
    return [v / sum(scaled) for v in scaled]


@dataclass
class Fusion:
    """What `fuse` returns: the fused model and its stages, the maps, and seconds per phase. The stages and
    baselines the pipeline does not need itself are made on first use (their seconds count under their phase)."""

    fused: nn.Module  # every stage the config asks for
    fused_no_bn: nn.Module  # the aligned weighted average, before BatchNorm recomputation
    aligned: list[nn.Module]  # each parent carried onto the fused model's channels
    maps: list[dict[str, ChannelMap]]  # per parent: group name -> map onto the fused model's channels
    groups: list[ChannelGroup]  # the fused model's channel groups
    weights: list[float]  # the averaging weights
    precision: Precision  # the forward passes' precision, resolved: evaluate the models in it too
    seconds: dict[str, float] = field(default_factory=dict)
    parents: list[nn.Module] = field(default_factory=list, repr=False)
    images: torch.Tensor | None = field(default=None, repr=False)  # the unlabelled training images the stages read
    norm: tuple = field(default=(), repr=False)
    cfg: FuseConfig = field(default_factory=FuseConfig, repr=False)
    made: dict[str, nn.Module] = field(default_factory=dict, repr=False)  # stages made so far, by column

    @property
    def fused_average(self) -> nn.Module:
        """The aligned average with BatchNorm recomputed ("average only"). When the refit sets every
        BatchNorm's statistics itself the pipeline does not need it, so it is computed on first use."""
        if "fused_average" not in self.made:
            with timed(self.seconds, "batchnorm"):
                self.made["fused_average"] = recompute_bn(
                    copy.deepcopy(self.fused_no_bn), self.images, self.norm, self.cfg.bn, self.precision
                )
        return self.made["fused_average"]

    def columns(self, baselines: bool = True, progress: bool = False) -> dict[str, nn.Module]:
        """Every model of a fusion table, by column: the stages, REPAIR alone from the same alignment (parents of
        the fused model's width only), and with `baselines` vanilla averaging without alignment (parents of the
        fused model's shapes only: as it is, with BatchNorm recomputed, and refit when the fusion is)."""
        out = {"fused_no_bn": self.fused_no_bn, "fused_average": self.fused_average, "fused": self.fused}
        if self.cfg.repair.enabled and not self.cfg.refit.enabled:
            out["fused_repair"] = self.fused
        elif same_widths(self.maps):
            if "fused_repair" not in self.made:
                with timed(self.seconds, "repair", progress):
                    self.made["fused_repair"] = repaired(
                        copy.deepcopy(self.fused_average),
                        self.aligned,
                        self.weights,
                        self.groups,
                        self.images,
                        self.norm,
                        self.cfg,
                        self.precision,
                    )
            out["fused_repair"] = self.made["fused_repair"]
        if baselines and len(self.parents) > 1 and all(same_shapes(m, self.fused) for m in self.parents):
            if "vanilla" not in self.made:
                with timed(self.seconds, "baselines", progress):
                    self.made.update(vanilla_models(self.parents, self.weights, self.images, self.norm, self.cfg, self.precision))
            out.update({k: v for k, v in self.made.items() if k.startswith("vanilla")})
        return out


def vanilla_models(
    models: list[nn.Module], weights: list[float], images: torch.Tensor, norm: tuple, cfg: FuseConfig, precision: Precision
) -> dict[str, nn.Module]:
    """Vanilla averaging without alignment, by column: as it is, with BatchNorm recomputed, and refit when `cfg` refits."""
    vanilla = average(models, weights).eval()
    out = {"vanilla": vanilla, "vanilla_bn": recompute_bn(copy.deepcopy(vanilla), images, norm, cfg.bn, precision)}
    if cfg.refit.enabled:
        out["vanilla_refit"] = refit(copy.deepcopy(out["vanilla_bn"]), models, weights, images, norm, cfg.refit, precision)
    return out


def same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def average(models: list[nn.Module], weights: list[float]) -> nn.Module:
    """The weighted average of the models' floating-point tensors (counters taken from the first)."""
    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        for k, t in out.state_dict().items():
            if t.is_floating_point():
                t.copy_(sum(w * s[k].to(t.device) for w, s in zip(weights, states)))
    return out


@full_float32()  # what the pipeline computes in float32 (the alignment, the targets of the refit) is float32 on a GPU too
def fuse(
    models: list[nn.Module],
    images: torch.Tensor,
    norm: tuple,
    cfg: FuseConfig,
    maps: list[dict[str, ChannelMap]] | None = None,
    target: nn.Module | None = None,
    progress: bool = False,
    class_counts: torch.Tensor | None = None,
) -> Fusion:
    """Fuse `models` (one architecture) on unlabelled uint8 training `images` normalised by `norm`.

    Every model is aligned onto the first (or carried through the given `maps`, one set per model)
    and carried onto the channels of `target`, a model of the same architecture whose width may
    differ from the parents' (default: the first model). The carried models are averaged with
    `cfg.weights`, BatchNorm statistics are recomputed, then REPAIR, the layer-wise refit and the distillation
    from the parents (`otfuse.distill`) run where `cfg` asks for them. One model and a narrower or wider `target`
    compresses or widens it. `class_counts` ([models, classes]: the training images of each class each model saw)
    weigh the classifier's refit (and the distillation's target) per class with `cfg.head` counts."""
    if len(models) < 1 or (len(models) < 2 and target is None):
        raise OtfuseError(f"fusion needs at least two models (or one and a target width), got {len(models)}")
    cfg.check(len(models))
    if len(images) < 2:
        raise OtfuseError(
            f"fusion reads {len(images)} image(s); BatchNorm statistics need at least two: give more (e.g. a larger "
            "--fusion-data N-per-class, or union)"
        )
    weights = cfg.model_weights(len(models), None if class_counts is None else class_counts.sum(1).tolist())
    seconds: dict[str, float] = {}
    anchor = models[0]
    dev = next(anchor.parameters()).device
    precision = resolve_precision(cfg.precision, dev)
    with timed(seconds, "groups", progress):
        per_model = groups_of(models + ([target] if target is not None else []), images, norm, same_width=False)
        groups = per_model.pop() if target is not None else per_model[0]
    if maps is None:
        # the alignment reads float32 activations whatever the precision: bf16 rounding flips near-tied channels
        # (18-46 of the 2,880 of a width-64 ResNet18), which moves the fused accuracy by up to 0.3 points (docs/speed.md)
        with timed(seconds, "alignment", progress):
            to_target = to_target_maps(anchor, per_model[0], groups, cfg.align, images, norm, progress)
            maps = [to_target] + [
                _chain(align(anchor, m, per_model[0], g, cfg.align, images, norm, progress), to_target)
                for m, g in zip(models[1:], per_model[1:])
            ]
            for _ in range(cfg.align.rounds - 1):
                maps = _realigned(models, per_model, maps, weights, images, norm, cfg, precision, progress)
    if len(maps) != len(models):
        raise OtfuseError(f"give one set of maps per model: {len(models)}, got {len(maps)}")
    if cfg.repair.enabled and not same_widths(maps):
        raise OtfuseError(
            "--repair matches the aligned parents' channel statistics, which needs parents of the fused "
            "model's width; leave --repair out (the refit handles other widths)"
        )
    into = target if target is not None else anchor
    aligned = [carry(m, g, mp, into=into, into_groups=groups) for m, g, mp in zip(models, per_model, maps)]
    with timed(seconds, "averaging", progress):
        fused_no_bn = average(aligned, weights).eval()
    made = {}
    if cfg.refit.enabled and not cfg.repair.enabled and refit_sets_every_batchnorm(fused_no_bn, images[:2], norm):
        fused = copy.deepcopy(fused_no_bn)  # the refit gives every BatchNorm its exact statistics: recomputing them first is wasted
    else:
        with timed(seconds, "batchnorm", progress):
            made["fused_average"] = recompute_bn(copy.deepcopy(fused_no_bn), images, norm, cfg.bn, precision, progress)
        fused = copy.deepcopy(made["fused_average"]) if cfg.repair.enabled or cfg.refit.enabled else made["fused_average"]
    if cfg.repair.enabled:
        with timed(seconds, "repair", progress):
            repaired(fused, aligned, weights, groups, images, norm, cfg, precision)
    head = head_weights(cfg, class_counts, weights)  # the classifier's target per class: the refit's and the distillation's
    if cfg.refit.enabled:
        with timed(seconds, "refit", progress):
            # no BatchNorm recomputation after it: the refit leaves each BatchNorm its layer's exact statistics.
            # Its targets are the parents' outputs on the fused model's channels: through permutations the aligned
            # parents compute exactly those; where a map merges or splits channels, the originals' carried through it
            permutations = all(m.perm is not None for per_model_maps in maps for m in per_model_maps.values())
            sources = None if permutations else [(m, output_maps(g, mp)) for m, g, mp in zip(models, per_model, maps)]
            refit(fused, aligned, weights, images, norm, cfg.refit, precision, progress, sources, head=head, head_probs=cfg.head_probs)
    distilled(fused, models, weights, head, images, norm, cfg, precision, passes(cfg.distill, class_counts), seconds, progress)
    return Fusion(fused, fused_no_bn, aligned, maps, groups, weights, precision, seconds, list(models), images, norm, cfg, made)


def distilled(
    fused: nn.Module,
    parents: list[nn.Module],
    weights: list[float],
    head: torch.Tensor | None,
    images: torch.Tensor,
    norm: tuple,
    cfg: FuseConfig,
    precision: Precision,
    epochs: float,
    seconds: dict[str, float],
    progress: bool = False,
) -> nn.Module:
    """`fused` trained in place for `epochs` passes towards the `parents`' target (`otfuse.distill`; 0: untouched),
    timed as the "distill" phase: the last stage of `fuse()` and of a budgeted fusion."""
    if epochs:
        with timed(seconds, "distill", progress):
            distill(
                fused, list(parents), weights, images, norm, replace(cfg.distill, epochs=epochs), precision, head, cfg.head_probs, progress
            )
    return fused


def head_weights(cfg: FuseConfig, class_counts: torch.Tensor | None, weights: list[float]) -> torch.Tensor | None:
    """[models, classes] weights of the classifier's refit target with `cfg.head` counts: each model's weight times
    its training images of the class, normalised per class (a class no model saw: the model weights). Parents that
    saw the same data (equal counts), or whose counts are not known (None), get the model weights: the equal fusion."""
    if cfg.head == "equal" or class_counts is None:
        return None
    if class_counts.shape[0] != len(weights):
        raise OtfuseError(f"--head counts: {class_counts.shape[0]} rows of class counts for {len(weights)} models; give one per model")
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    counts = w * class_counts.double()
    total = counts.sum(0, keepdim=True)
    return torch.where(total > 0, counts / total.where(total > 0, torch.ones_like(total)), w.expand_as(counts)).float()


def _realigned(
    models: list[nn.Module],
    per_model: list[list[ChannelGroup]],
    maps: list[dict[str, ChannelMap]],
    weights: list[float],
    images: torch.Tensor,
    norm: tuple,
    cfg: FuseConfig,
    precision: Precision,
    progress: bool,
) -> list[dict[str, ChannelMap]]:
    """One more alignment round: every model (the first too) aligned onto the weighted average of all of them carried
    through `maps`, BatchNorm recomputed. The models then meet at a centre they all shape, not at the first model."""
    if not same_widths(maps):
        raise OtfuseError(
            "--rounds above 1 re-aligns the parents onto their average, which needs parents of the fused model's "
            "width; use --rounds 1 to fuse into another width"
        )
    anchor, groups = models[0], per_model[0]
    carried = [carry(m, g, mp, into=anchor, into_groups=groups) for m, g, mp in zip(models, per_model, maps)]
    centre = recompute_bn(average(carried, weights).eval(), images, norm, cfg.bn, precision)
    return [align(centre, m, groups, g, cfg.align, images, norm, progress) for m, g in zip(models, per_model)]


def same_widths(maps: list[dict[str, ChannelMap]]) -> bool:
    """Whether every map is between as many channels on both sides (parents of the fused model's width)."""
    return all(m.n_target == m.n_source for per_model in maps for m in per_model.values())


def _chain(onto_anchor: dict[str, ChannelMap], to_target: dict[str, ChannelMap]) -> dict[str, ChannelMap]:
    return {name: m.then(to_target[name]) for name, m in onto_anchor.items()}


def repaired(
    model: nn.Module,
    aligned: list[nn.Module],
    weights: list[float],
    groups: list[ChannelGroup],
    images: torch.Tensor,
    norm: tuple,
    cfg: FuseConfig,
    precision: Precision,
) -> nn.Module:
    """REPAIR in place on a merged model, then BatchNorm recomputed: the corrections move every later layer's inputs."""
    repair(model, aligned, weights, groups, images, norm, cfg.repair, precision)
    return recompute_bn(model, images, norm, cfg.bn, precision)


@contextmanager
def timed(seconds: dict[str, float], phase: str, progress: bool = False) -> Iterator[None]:
    """Add the seconds the block takes to `seconds[phase]`; on a GPU, once its queued work is done (CUDA runs
    asynchronously: without the synchronisation a phase's kernels would be counted in the next phase).
    With `progress` and stderr not a terminal (a log file, where no progress bar shows), one line per phase on
    stdout, beside training's per-epoch lines (stderr stays for the one-line error of a bad input)."""
    _synchronize()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _synchronize()
        took = time.perf_counter() - t0
        seconds[phase] = seconds.get(phase, 0.0) + took
        if progress and not sys.stderr.isatty():
            print(f"{phase}: {took:.1f} s", flush=True)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
