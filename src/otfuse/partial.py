"""Partial merging: the layers up to a cut fused, each parent's later layers kept as a branch, the branches' logits averaged.

    merged = partial_merge(fusion, "layer3.1", images, norm)   # fused up to layer3.1's output
    merged(x)                                  # the weighted mean of every aligned parent's tail on the fused stem's output
    cost(merged, example)                      # {"params": ..., "flops": ...}
    cut_points(model, example)                 # every cut where one tensor flows: ["input", "bn1", "layer1.0", ..., "fc"]

A cut is named by a module: everything up to and including its output is the fused model's, everything after
runs once per parent, on the parent's weights carried onto the fused model's channels (`Fusion.aligned`), and
their logits are averaged with the fusion's weights. The cut must be one tensor (torch.fx checks that nothing
else crosses it: a residual's skip, the input); `input` merges nothing (the mean of the parents' logits) and the
last module merges everything (the fused model). Where something was merged, each branch is adapted to the fused
stem's outputs, which differ from what its parent's own layers gave it: where the fusion refits, the branch's layers
are refit (`otfuse.refit`, no labels) so that it reproduces its parent's outputs; otherwise its BatchNorm
statistics are recomputed.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from otfuse.bn import recompute_bn
from otfuse.data import normalize
from otfuse.errors import OtfuseError
from otfuse.evaluate import logits
from otfuse.fusion import FuseConfig, Fusion
from otfuse.precision import Precision
from otfuse.refit import refit, units
from otfuse.report import accuracies

INPUT = "input"  # the cut before the first layer: nothing merged
MERGE_UNTIL_HELP = (
    "also report partial merges: the layers up to this module's output fused, each parent's later layers kept "
    "as a branch, their logits averaged; a module (e.g. layer3.1), several separated by commas, input, or all "
    "(every cut where one tensor flows); with their parameters and FLOPs (default: none)"
)


class PartialMerge(nn.Module):
    """A fused stem and one tail per parent; the output is the weighted mean of the tails' outputs."""

    def __init__(self, stem: nn.Module, tails: list[nn.Module], weights: list[float]):
        super().__init__()
        self.stem, self.tails, self.weights = stem, nn.ModuleList(tails), list(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if not len(self.tails):
            return h
        return sum(w * tail(h) for w, tail in zip(self.weights, self.tails))


class _CutTracer(fx.Tracer):
    """torch.fx's tracer, with the module at the cut kept whole (one node whose output is the cut)."""

    def __init__(self, cut: str):
        super().__init__()
        self.cut = cut

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname == self.cut or super().is_leaf_module(m, qualname)


def _graph(model: nn.Module, cut: str) -> fx.Graph:
    try:
        return _CutTracer(cut).trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, NotImplementedError) on data-dependent code
        raise OtfuseError(
            f"--merge-until {cut}: {type(model).__name__} cannot be traced by torch.fx "
            f"({type(exc).__name__}: {' '.join(str(exc).split()[:10])}); partial merging needs a traceable model"
        ) from None


def split_graph(model: nn.Module, cut: str) -> tuple[fx.Graph, fx.Graph | None]:
    """(the graph up to the cut's output, the graph from it to the model's output; None for the last module's cut).
    One clear error where the cut is not a module called once, or where more than its one tensor crosses it."""
    graph = _graph(model, cut)
    nodes = list(graph.nodes)
    at = [n for n in nodes if n.op == "call_module" and n.target == cut]
    if cut != INPUT and len(at) != 1:
        known = ", ".join(n for n, _ in model.named_modules() if n and n.count(".") <= 1)
        raise OtfuseError(
            f"--merge-until {cut}: {'no module of that name runs' if not at else 'that module runs more than once'} "
            f"in the model; choose a module called once, e.g. one of {known[:200]}"
        )
    cut_node = next(n for n in nodes if n.op == "placeholder") if cut == INPUT else at[0]
    before = set(nodes[: nodes.index(cut_node) + 1])
    after = nodes[nodes.index(cut_node) + 1 :]
    for n in after:
        crossing = [a for a in n.all_input_nodes if a in before and a is not cut_node and a.op != "get_attr"]
        if crossing:
            raise OtfuseError(
                f"--merge-until {cut}: {crossing[0].name} crosses the cut beside its output (a skip connection?); "
                "cut where one tensor flows, e.g. at a block's output"
            )
    stem = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[: nodes.index(cut_node) + 1]:
        env[n] = stem.node_copy(n, lambda a: env[a])
    stem.output(env[cut_node])
    if all(n.op == "output" for n in after):
        return stem, None
    tail = fx.Graph()
    env = {cut_node: tail.placeholder("h")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a parameter read before the cut in trace order, used after it
            env[a] = tail.node_copy(a, lambda b: env[b])
        return env[a]

    for n in after:
        env[n] = tail.node_copy(n, arg)
    return stem, tail


def partial_merge(fusion: Fusion, cut: str, images: torch.Tensor, norm: tuple) -> PartialMerge:
    """The fused model up to `cut`, then each aligned parent's layers after it, their outputs averaged by the fusion's
    weights. Where anything was merged, each tail is adapted to the fused stem's outputs on `images` as the fusion
    adapts its own layers: refit to its parent's outputs where the fusion refits (`fusion.cfg.refit`), else its
    BatchNorm statistics recomputed (`fusion.cfg.bn`); in the fusion's precision."""
    cfg, precision = fusion.cfg, fusion.precision
    stem_graph, tail_graph = split_graph(fusion.fused, cut)
    stem = fx.GraphModule(copy.deepcopy(fusion.fused), stem_graph)
    if tail_graph is None:
        return PartialMerge(stem, [], fusion.weights).eval()
    if cut == INPUT or not cfg.refit.enabled:
        made = [fx.GraphModule(copy.deepcopy(m), tail_graph) for m in fusion.aligned]
        merged = PartialMerge(stem, made, fusion.weights).eval()
        return merged if cut == INPUT else recompute_bn(merged, images, norm, cfg.bn, precision)
    made = [fx.GraphModule(_refit_tail(fusion.fused, m, tail_graph, images, norm, cfg, precision), tail_graph) for m in fusion.aligned]
    return PartialMerge(stem, made, fusion.weights).eval()


def _refit_tail(
    fused: nn.Module, parent: nn.Module, tail_graph: fx.Graph, images: torch.Tensor, norm: tuple, cfg: FuseConfig, precision: Precision
) -> nn.Module:
    """The fused model with `parent`'s layers after the cut, those refit so that, fed the fused stem's outputs, each
    reproduces the parent's own output (the parent's weights anchor the ridge)."""
    hybrid = copy.deepcopy(fused)
    names = {str(n.target) for n in tail_graph.nodes if n.op in ("call_module", "get_attr")}
    for name in names:
        owner, _, attr = name.rpartition(".")
        setattr(hybrid.get_submodule(owner) if owner else hybrid, attr, copy.deepcopy(_attr(parent, name)))
    dev = next(hybrid.parameters()).device
    example = normalize(images[:2], norm).to(dev)
    layers = {layer for layer, _ in units(hybrid, example) if any(layer == n or layer.startswith(n + ".") for n in names)}
    return refit(hybrid, [parent], [1.0], images, norm, cfg.refit, precision, layers=layers)


def _attr(model: nn.Module, name: str):
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def cut_points(model: nn.Module, depth: int = 2) -> list[str]:
    """Every cut of `model` where one tensor flows, in forward order: `input`, then the modules at most `depth` levels
    deep (e.g. `bn1`, `layer1.0`, `layer1`) whose output is the only thing crossing; a module ending at the same
    node as an earlier one (a stage and its last block) is listed once, by the deeper name."""
    out = [INPUT]
    order = {}
    for name, _ in model.named_modules():
        if not name or name.count(".") >= depth:
            continue
        try:
            split_graph(model, name)
        except OtfuseError:
            continue
        order[name] = _position(model, name)
    by_position: dict[int, str] = {}
    for name, pos in order.items():
        if pos not in by_position or name.count(".") > by_position[pos].count("."):
            by_position[pos] = name
    return out + [by_position[p] for p in sorted(by_position)]


def _position(model: nn.Module, name: str) -> int:
    """How many tensor operations run up to the module's output (in the model traced down to its leaves)."""
    nodes = [n for n in fx.symbolic_trace(model).graph.nodes if n.op not in ("get_attr", "placeholder", "output")]
    inside = [i for i, n in enumerate(nodes) if n.op == "call_module" and (n.target == name or n.target.startswith(name + "."))]
    return max(inside)


def cost(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """The model's parameters and floating-point operations (multiply and add counted apart) for one `example` image."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(example[:1])
    return {"params": sum(p.numel() for p in model.parameters()), "flops": int(counter.get_total_flops())}


def chosen_cuts(model: nn.Module, text: str) -> list[str]:
    """`all` (every cut_points cut) or comma-separated module names, each checked to be a cut."""
    if text == "all":
        return cut_points(model)
    cuts = [c.strip() for c in text.split(",") if c.strip()]
    if not cuts:
        raise OtfuseError("--merge-until: give a module (e.g. layer3.1), several separated by commas, input, or all")
    for c in cuts:
        if c != INPUT:
            split_graph(model, c)
    return cuts


def partial_rows(
    fusion: Fusion,
    cuts: list[str],
    images: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: tuple,
    tasks: list[tuple[int, ...]] | None = None,
    progress: bool = False,
) -> list[dict]:
    """One row per cut: its parameters and FLOPs (also as multiples of one parent's), seconds to build, and its joint
    (and per-task) accuracy on (x, y), in the fusion's precision."""
    one = cost(fusion.parents[0], normalize(x[:1], norm).to(next(fusion.fused.parameters()).device))
    rows = []
    for cut in cuts:
        t0 = time.perf_counter()
        merged = partial_merge(fusion, cut, images, norm)
        seconds = time.perf_counter() - t0
        c = cost(merged, normalize(x[:1], norm).to(next(merged.parameters()).device))
        acc = accuracies("accuracy", logits(merged, x, norm, precision=fusion.precision), y, tasks)
        rows.append(
            {"cut": cut, **c, "params_x": c["params"] / one["params"], "flops_x": c["flops"] / one["flops"], "seconds": seconds, **acc}
        )
        if progress:
            print(
                f"merged until {cut:<10} params x{rows[-1]['params_x']:.2f}  flops x{rows[-1]['flops_x']:.2f}  "
                + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()),
                flush=True,
            )
    return rows
