"""Channels mixed by `torch.einsum` with a bare parameter, traced as the Linear they compute.

    sites = einsum_sites(model, x)            # every einsum of an activation with a 2-D parameter of the model
    with traced_as_linears(model, sites):     # each computed by a stand-in nn.Linear child during a trace
        graph = tp.DependencyGraph().build_dependency(model, x)
    slot = translated(sites, (name, "weight", 0))   # the stand-in's weight axis -> the parameter's own

`torch.einsum("nchw,cd->nd", x, self.w)` contracts the activation's channels c with one axis of the parameter and
writes its other axis d where the output keeps its channels: a Linear from c to d (summing the other letters it
drops first). Torch-Pruning sees einsum's inside (views, permutes and a bmm) and cannot follow it; during the trace
each such call runs through a stand-in Linear (no bias) registered beside the parameter, whose weight axes are the
parameter's (0: d, 1: c). An einsum that is no such Linear (the parameter's letters elsewhere) is one OtfuseError.
The channel axis of a tensor: dim 1 of a 2-D, 4-D or 5-D one, the last of a 3-D (batch, tokens, channels) one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from otfuse.errors import OtfuseError

STAND_IN = "_otfuse_einsum_"  # the stand-in's attribute name: this prefix and the parameter's own name


@dataclass
class EinsumSite:
    """One einsum of an activation with parameter `owner`.`tensor`, where the parameter's axis `axis_in` meets the
    activation's channels and its axis `axis_out` becomes the output's."""

    owner: str
    tensor: str
    equation: str
    axis_in: int
    axis_out: int

    @property
    def stand_in(self) -> str:
        return f"{self.owner}.{STAND_IN}{self.tensor}".lstrip(".")


def _channel(sub: str) -> str:
    return sub[-1] if len(sub) == 3 else sub[1]


def _site(equation: str, operands: tuple, params: dict[int, str]) -> EinsumSite | None:
    """The site of one einsum call when one operand is a 2-D parameter of the model and the other an activation."""
    held = [i for i, t in enumerate(operands) if id(t) in params]
    if len(operands) != 2 or len(held) != 1 or operands[held[0]].dim() != 2:
        return None
    name = params[id(operands[held[0]])]
    eq = equation.replace(" ", "")
    ins, _, out = eq.partition("->")
    subs = ins.split(",")
    act, par = subs[1 - held[0]], subs[held[0]]
    refuse = OtfuseError(
        f"parameter {name}: torch.einsum('{equation}') mixes channels in a way otfuse does not follow (it follows a "
        "2-D parameter that maps the activation's channel axis to the output's); write it as an nn.Linear or nn.Conv2d"
    )
    if "..." in eq or not out or len(act) not in (2, 3, 4, 5) or len(out) not in (2, 3, 4, 5):
        raise refuse
    c, d = _channel(act), _channel(out)
    kept = [s for s in act if s in out and s != c]
    if sorted(par) != sorted((c, d)) or c == d or c in out or [s for s in out if s != d] != kept:
        raise refuse
    owner, _, tensor = name.rpartition(".")
    return EinsumSite(owner, tensor, equation, par.index(c), par.index(d))


def _operands(operands: tuple) -> tuple:
    """einsum's operands, given one by one or as one list."""
    return tuple(operands[0]) if len(operands) == 1 and isinstance(operands[0], list | tuple) else operands


class _EinsumAs(TorchFunctionMode):
    """`torch.einsum` calls made by this thread in the block go to `fn`: a torch function mode lives on the calling
    thread's mode stack, so a fusion in another thread (a notebook, a server, the federated strategy) keeps the real
    einsum, and nothing is left replaced if the block ends abnormally. Inside `fn` the mode is off: its
    `torch.einsum` is the real one."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.einsum:
            return self.fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def _einsum_as(fn) -> Iterator[None]:
    with _EinsumAs(fn):
        yield


def einsum_sites(model: nn.Module, x: torch.Tensor, inside: tuple[str, ...] = ()) -> list[EinsumSite]:
    """Every einsum of an activation with a 2-D parameter of `model` in one forward pass on `x` (each parameter once),
    but for parameters of the modules named in `inside` (layers described otherwise: attention)."""
    params = {id(p): n for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(tuple(f"{m}." for m in inside))}
    if not params:
        return []
    found: dict[str, EinsumSite] = {}

    def record(equation, *operands):
        ops = _operands(operands)
        site = _site(equation, ops, params) if isinstance(equation, str) else None
        if site is not None:
            found.setdefault(f"{site.owner}.{site.tensor}", site)
        return torch.einsum(equation, *operands)

    was_training = model.training
    try:
        with _einsum_as(record), torch.no_grad():
            model.eval()(x)  # eval: a look must not move BatchNorm statistics
    except OtfuseError:
        raise
    except Exception:
        return []  # the trace that follows says what fails
    finally:
        model.train(was_training)
    return list(found.values())


def _linear(site: EinsumSite, act: torch.Tensor, equation: str, layer: nn.Linear) -> torch.Tensor:
    """The einsum at `site` computed by `layer`: the dropped letters summed, the channels moved last and back."""
    ins, _, out = equation.replace(" ", "").partition("->")
    act_sub = next(s for s in ins.split(",") if len(s) == act.dim())
    c, d = _channel(act_sub), _channel(out)
    dropped = [i for i, s in enumerate(act_sub) if s not in out and s != c]
    kept = "".join(s for s in act_sub if s not in out and s != c)
    y = act.sum(dropped) if dropped else act
    sub = "".join(s for s in act_sub if s not in kept)
    y = layer(y.movedim(sub.index(c), -1))
    return y.movedim(-1, out.index(d))


@contextmanager
def traced_as_linears(model: nn.Module, sites: list[EinsumSite]) -> Iterator[dict[nn.Module, str]]:
    """In the block, each site's parameter has a stand-in Linear child (its weight a (d, c) copy) and each einsum at a
    site runs through it, so a graph trace sees a Linear from the activation's channels to the output's. Yields the
    stand-ins by name (they are gone after the block)."""
    if not sites:
        yield {}
        return
    by_param: dict[int, tuple[EinsumSite, nn.Linear]] = {}
    added = []
    for site in sites:
        owner = model.get_submodule(site.owner)
        w = getattr(owner, site.tensor).detach()
        layer = nn.Linear(w.shape[site.axis_in], w.shape[site.axis_out], bias=False).to(w)
        with torch.no_grad():
            layer.weight.copy_(w.permute(site.axis_out, site.axis_in))
        owner.add_module(f"{STAND_IN}{site.tensor}", layer)
        added.append((owner, f"{STAND_IN}{site.tensor}"))
        by_param[id(getattr(owner, site.tensor))] = (site, layer)

    def run(equation, *operands):
        ops = _operands(operands)
        held = [t for t in ops if id(t) in by_param]
        if len(ops) == 2 and len(held) == 1:
            site, layer = by_param[id(held[0])]
            return _linear(site, next(t for t in ops if t is not held[0]), equation, layer)
        return torch.einsum(equation, *operands)

    try:
        with _einsum_as(run):
            yield {layer: site.stand_in for site, layer in by_param.values()}
    finally:
        for owner, attr in added:
            delattr(owner, attr)


def translated(sites: list[EinsumSite], slot: tuple[str, str, int]) -> tuple[str, str, int] | None:
    """A stand-in's weight slot as the parameter's own (None for a stand-in's other slots: it has none); any other
    slot unchanged."""
    module, tensor, axis = slot
    for site in sites:
        if module == site.stand_in:
            return (site.owner, site.tensor, site.axis_out if axis == 0 else site.axis_in) if tensor == "weight" else None
    return slot
