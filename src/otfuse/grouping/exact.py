"""Channel groups found, then checked: a grouping that does not permute a model exactly is refused, never returned.

groups = channel_groups(model, example_input)     # find_groups, checked on a random-weight copy
per_model = groups_of([model_a, model_b], images, norm)   # checked to have the same structure
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from otfuse.errors import OtfuseError
from otfuse.grouping.attention import attention_layers
from otfuse.grouping.group import ChannelGroup, check_same_groups, example_input
from otfuse.grouping.heads import LAYOUTS, relaid
from otfuse.grouping.shuffles import channel_rearrangement, pixel_attention
from otfuse.grouping.trace import find_groups
from otfuse.maps import carry, random_maps, stored_tensors
from otfuse.precision import full_float32

EXACT_RTOL = {torch.float64: 1e-7, torch.float32: 1e-3}  # relative output error of a permuted copy that refuses a grouping
EXACT_FLOAT64_PARAMS = 100_000_000  # above this many parameters the check runs in float32: two float64 copies of
# regnet_y_128gf (644M) and its trace do not fit in 24 GB


def channel_groups(model: nn.Module, example_input: torch.Tensor, time_limit: float = 300.0) -> list[ChannelGroup]:
    """Every permutable channel group of `model`, in forward order (`otfuse.grouping.trace.find_groups`), checked
    numerically: a copy with random weights, every group randomly permuted, must compute what the copy
    computes on `example_input`. A grouping that fails is one OtfuseError naming the first group that
    breaks it, never a silently wrong model. Random weights, because a model's own (a branch
    initialised to zero) could hide a wrong group that another model's weights would show."""
    return check_exact(model, find_groups(model, example_input, time_limit), example_input)


@full_float32()  # TF32 rounding on a GPU would pass for a broken group, or fail an exact one
def check_exact(model: nn.Module, groups: list[ChannelGroup], x: torch.Tensor) -> list[ChannelGroup]:
    """`groups`, after checking that permuting every one keeps `model`'s function (random weights, input `x`); an
    attention layer whose q/k/v channels do not pair up as in plain attention is given the first of `LAYOUTS` that
    keeps it. Anything else that fails is one OtfuseError."""
    try:
        # float64: a deep random network's outputs can reach 1e8, where float32's rounding alone is 1e-4 relative,
        # while a wrong group changes them by a fraction of their size even where the signal has decayed
        dtype = torch.float64 if sum(p.numel() for p in model.parameters()) <= EXACT_FLOAT64_PARAMS else torch.float32
        probe = _randomized(model).eval().to(dtype)
        probe_x = x.to(next(probe.parameters()).device, dtype)
        with torch.no_grad():
            want = probe(probe_x)
    except Exception as exc:  # a model that cannot be copied, or run with random weights
        raise OtfuseError(
            f"{type(model).__name__}: otfuse cannot check its channel groups on a random-weight copy "
            f"({type(exc).__name__}: {' '.join(str(exc).split()[:12])}); it cannot fuse this model"
        ) from None
    with torch.no_grad():
        if _breaks(probe, groups, probe_x, want) is None:
            return groups
        groups = _exact_layouts(probe, groups, probe_x, want)
        if _breaks(probe, groups, probe_x, want) is None:
            return groups
        # the first group whose permutation alone (with its family: blocks that move alike) fails or changes the function
        family = lambda g: [h for h in groups if h.family == g.family] if g.family else [g]
        culprit, why = next(((g, w) for g in groups for w in [_breaks(probe, family(g), probe_x, want)] if w is not None), (groups[0], ""))
    where = ", ".join(sorted({m.module for m in culprit.members}))[:200]
    if why:
        raise OtfuseError(
            channel_rearrangement(model, x)
            or pixel_attention(model, attention_layers(model))
            or f"{type(model).__name__}: permuting channel group {culprit.name} "
            f"({where}) fails ({why}): the layout between these layers is one otfuse does not follow; it "
            "cannot fuse this model"
        )
    parametrized = sorted({m.module.partition(".parametrizations.")[0] for m in culprit.members if ".parametrizations." in m.module})
    if parametrized:
        raise OtfuseError(
            f"{type(model).__name__}: module {parametrized[0]}'s parametrised weight does not commute with permuting "
            "its channels (an orthogonal or other coupling parametrisation), so it cannot be permuted exactly; "
            "remove it (torch.nn.utils.parametrize.remove_parametrizations) before fusing"
        )
    raise OtfuseError(
        channel_rearrangement(model, x)
        or pixel_attention(model, attention_layers(model))
        or f"{type(model).__name__}: permuting channel group {culprit.name} ({where}) "
        "changes what the model computes, so the layout between these layers (a channel split, shuffle or "
        "reshape otfuse does not follow) cannot be permuted exactly; otfuse refuses it rather than fuse it wrongly"
    )


def _exact_layouts(probe: nn.Module, groups: list[ChannelGroup], x: torch.Tensor, want: torch.Tensor) -> list[ChannelGroup]:
    """`groups` with every attention layer whose own groups break the function relaid in the first layout that keeps
    it (the last one that worked is tried first: a model's layers are alike); layers no layout fixes stay as they are."""
    family = lambda gs, g: [h for h in gs if h.family == g.family]
    tried = list(LAYOUTS)
    for name in dict.fromkeys(g.attention.name for g in groups if g.attention is not None):
        own = next(g for g in groups if g.attention is not None and g.attention.name == name)
        if _breaks(probe, family(groups, own), x, want) is None:
            continue
        for layout in [t for t in tried if t != own.layout]:
            trial = relaid(groups, {name: layout})
            mine = next(g for g in trial if g.attention is not None and g.attention.name == name)
            if _breaks(probe, family(trial, mine), x, want) is None:
                groups, tried = trial, [layout] + [t for t in tried if t != layout]
                break
    return groups


def layouts_of(groups: list[ChannelGroup]) -> dict[str, str]:
    """The layout of every attention layer in `groups` that is not plain attention's: for `relaid` on another model's groups."""
    return {g.attention.name: g.layout for g in groups if g.attention is not None and g.layout not in ("", "dot")}


def _breaks(probe: nn.Module, groups: list[ChannelGroup], x: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when permuting `groups` (one full cycle each) keeps `probe`'s output `want` on `x`; "" when it changes
    the output; the failure, in a few words, when permuting raises."""
    try:
        return None if _error(want, carry(probe, groups, random_maps(groups, seed=0, cycles=True))(x)) <= EXACT_RTOL[x.dtype] else ""
    except Exception as exc:
        return str(exc) if isinstance(exc, OtfuseError) else f"{type(exc).__name__}: {' '.join(str(exc).split()[:12])}"


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = _first_tensor(a), _first_tensor(b)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def _first_tensor(out) -> torch.Tensor:
    """A model's output as one float tensor (the first of a tuple or dict)."""
    while not isinstance(out, torch.Tensor):
        out = next(iter(out.values())) if isinstance(out, dict) else out[0]
    return out.float()


def _randomized(model: nn.Module) -> nn.Module:
    """A copy of `model` with random parameters and BatchNorm statistics of a sensible scale (seeded): weights of
    two or more dimensions ~ N(0, 1/fan-in), per-channel vectors near 1 (variances, scales) or near 0 (means,
    biases). Other buffers keep their values: a fixed blur filter or a constant is the same in every model that
    is fused, and one that varies by channel shows unpermuted just as well."""
    probe = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    stats = {n for n, _ in probe.named_buffers() if n.endswith(("running_mean", "running_var"))}
    with torch.no_grad():
        for name, t in stored_tensors(probe).items():
            if not t.is_floating_point() or (name not in stats and not isinstance(t, nn.Parameter)):
                continue
            leaf = name.rpartition(".")[2]
            if t.ndim >= 2 and t[0].numel() > 1:
                r = torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5
            elif leaf in ("running_var", "weight", "original0", "gamma", "gain") or "scale" in leaf:
                r = torch.rand(t.shape, generator=gen) + 0.5
            else:
                r = torch.randn(t.shape, generator=gen) * 0.2
            t.copy_(r.to(t))
    return probe


def groups_of(models: list[nn.Module], images: torch.Tensor, norm: tuple, same_width: bool = True) -> list[list[ChannelGroup]]:
    """Every model's channel groups, after checking they all have the first one's structure
    (and its numbers of channels, unless `same_width` is False)."""
    per_model = [find_groups(m, example_input(images, norm, m)) for m in models]
    for g in per_model[1:]:
        check_same_groups(per_model[0], g, sizes=same_width)
    first = check_exact(models[0], per_model[0], example_input(images, norm, models[0]))  # one structure: one check
    return [first] + [relaid(g, layouts_of(first)) for g in per_model[1:]]
