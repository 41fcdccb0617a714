"""Torch-Pruning and torch's autograd internals, behind one module: the only importer of `torch_pruning` and the only
reader of private torch or Torch-Pruning attributes in otfuse.

    check_versions()                                   # the tested torch and Torch-Pruning, or one OtfuseError
    graph = dependency_graph(model, x, pruners, maps)  # DepGraph's trace, under the two patches it needs
    update_index_maps(graph)                           # its index maps, before otfuse's recognisers redo some
    set_pair(node, inp, into, back)                    # a recogniser's index maps, written here and only here
    for reached in coupled(graph, order, names, heads, pinned): ...   # each producer's channels and where they go

A Torch-Pruning or torch release that renames what is read here (`_saved_*` autograd attributes, `_input_metadata`,
Torch-Pruning's index-map classes, `_HybridIndex`, `Node._name`, `DependencyGraph._detect_unwrapped_parameters`) is
upgraded in this file: diff it against the new release. The recognisers (`otfuse.grouping.recognise`) decide what an
op does to the channels; this module reads the trace for them and writes their index maps.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning._helpers import _HybridIndex

from otfuse.errors import OtfuseError
from otfuse.grouping.group import CONV, CONV_T

# what the grouping is tested with: it reads Torch-Pruning's internals and torch's autograd graph, which other
# releases change; OTFUSE_UNTESTED_VERSIONS=1 runs it anyway (to try an upgrade), with one warning
TORCH_PRUNING = "1.6.1"
TORCH_RANGE = ((2, 11), (2, 14))  # first and last minor release tested, bounds included
# Torch-Pruning's index-map builder and DependencyGraph._detect_unwrapped_parameters are patched while a graph is
# built (they are module and class attributes: every thread sees them); one build at a time keeps another thread's
# build on the originals, and the originals put back whatever order the threads finish in. Whoever rewrites a
# graph's index maps holds it too (warning filters are process-wide).
LOCK = threading.RLock()


def untested_versions(torch_version: str, tp_version: str) -> str:
    """What is outside the tested versions, in words; empty when both are tested."""
    minor = re.match(r"(\d+)\.(\d+)", torch_version)
    found = (int(minor[1]), int(minor[2])) if minor else (0, 0)
    bad = [f"torch-pruning {tp_version}"] if tp_version != TORCH_PRUNING else []
    bad += [f"torch {torch_version}"] if not TORCH_RANGE[0] <= found <= TORCH_RANGE[1] else []
    return " and ".join(bad)


@functools.lru_cache(maxsize=1)
def check_versions() -> None:
    """Refuse, in one line naming the tested versions, a torch or Torch-Pruning the grouping was not tested with
    (`tp.__version__` misreports 1.6.1 as 1.6.0: the installed distribution's metadata is read instead)."""
    bad = untested_versions(torch.__version__, metadata.version("torch-pruning"))
    if not bad:
        return
    (lo, hi) = TORCH_RANGE
    tested = f"torch-pruning {TORCH_PRUNING} with torch {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"
    if os.environ.get("OTFUSE_UNTESTED_VERSIONS") == "1":
        warnings.warn(f"channel grouping with {bad}, which otfuse is not tested with ({tested})", stacklevel=2)
        return
    raise OtfuseError(
        f"otfuse's channel grouping is tested with {tested}, not {bad}: install those "
        f"(pip install 'torch-pruning=={TORCH_PRUNING}' 'torch>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}'), "
        "or set OTFUSE_UNTESTED_VERSIONS=1 to try anyway"
    )


# --- the trace ---------------------------------------------------------------------------------


def dependency_graph(model: nn.Module, x: torch.Tensor, pruners: dict, maps: set[int]) -> Any:
    """Torch-Pruning's DependencyGraph of `model` traced on `x`, `pruners` its customised pruners, the parameters in
    `maps` coupled to channels on dim 1 (a learned (1, C, H, W) position map), a concatenation it cannot size left
    for `otfuse.grouping.recognise` to size."""
    with _lenient_concat_maps(), _parameters_on_channels(maps), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch_pruning")  # its shape inference's depth notices: not the user's concern
        return tp.DependencyGraph().build_dependency(model, x, verbose=False, customized_pruners=pruners)


def unwrapped_parameters(graph: Any) -> dict[int, int]:
    """id(parameter) -> the axis DepGraph couples to channels, for the bare parameters it found (ConvNeXt's layer scale)."""
    return {id(p): dim for p, dim in getattr(graph, "unwrapped_parameters", [])}


@contextmanager
def quiet() -> Iterator[None]:
    """Torch-Pruning's warnings silenced in the block, under the lock (warning filters are process-wide)."""
    with LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch_pruning")
        yield


@contextmanager
def _patched(owner: object, attr: str, make: Callable) -> Iterator[None]:
    """`owner.attr` replaced by `make(original)` in the block, under the one lock for Torch-Pruning's patches: the
    original is read under it too, so it is never another thread's patch, and it is always put back."""
    with LOCK:
        original = getattr(owner, attr)
        setattr(owner, attr, make(original))
        try:
            yield
        finally:
            setattr(owner, attr, original)


def _lenient_concat_maps():
    """Let Torch-Pruning 1.6 finish building a graph with a concatenation it cannot size (DPN, CSP-Darknet: its
    own TypeError, summing a None); `otfuse.grouping.recognise` then sizes it from the autograd graph."""

    def lenient(original: Callable) -> Callable:
        def update(graph, node):
            try:
                original(graph, node)
            except TypeError:
                pass

        return update

    return _patched(tp.dependency.index_mapping, "update_concat_index_mapping", lenient)


def _parameters_on_channels(maps: set[int]):
    """Torch-Pruning 1.6 with the parameters in `maps` coupled to channels on dim 1."""

    def coupled(original: Callable) -> Callable:
        def detect(self, unwrapped_parameters):
            names, found = original(self, unwrapped_parameters)
            return names, [type(u)(parameters=u.parameters, pruning_dim=1 if id(u.parameters) in maps else u.pruning_dim) for u in found]

        return detect

    return _patched(tp.DependencyGraph, "_detect_unwrapped_parameters", coupled)


# --- reading the trace: autograd nodes and DepGraph nodes --------------------------------------


def signed(dim: int) -> int:
    """A dim as autograd saved it: a negative one is stored as its unsigned 64-bit value."""
    return dim - (1 << 64) if dim >= 1 << 63 else dim


def saved(fn: Any, name: str, default: Any = None) -> Any:
    """What the autograd node `fn` saved of its forward call's argument `name` (`dim`, `dims`, `dim0`, `keepdim`,
    `upscale_factor`, `self`, ...), or `default`."""
    return getattr(fn, f"_saved_{name}", default)


def saved_sizes(fn: Any) -> tuple[int, ...]:
    """The input sizes `fn` saved (a view's, a reduction's, a slice's); empty when it saved none."""
    return tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ()))


def view_sizes(fn: Any) -> tuple[int, ...]:
    """The input sizes a view/reshape backward node saved (empty for any other node)."""
    named = type(fn).__name__
    return saved_sizes(fn) if "View" in named or "Reshape" in named else ()


def input_shapes(fn: Any) -> list[torch.Size]:
    """The shapes of the gradients `fn` receives: its forward op's outputs."""
    return [m.shape for m in (getattr(fn, "_input_metadata", None) or ())]


def output_shape(fn: Any, nr: int) -> torch.Size:
    """The shape of output `nr` of the forward op behind autograd node `fn` (a leaf's own shape)."""
    if hasattr(fn, "variable"):
        return fn.variable.shape
    return fn._input_metadata[nr].shape


def op_type(node: Any) -> str:
    """A DepGraph node's kind: "split", "concat", "reshape", "slice", "output", "elementwise", ..."""
    return node.type.name.lower()


def node_name(node: Any) -> str:
    """A DepGraph node's module name ("" for an op of its own: an addition, a split)."""
    return node._name or ""


def forward_pre_hooks(module: nn.Module) -> list:
    return list(module._forward_pre_hooks.values())


# --- writing index maps ------------------------------------------------------------------------


def update_index_maps(graph: Any) -> None:
    """Torch-Pruning's own index maps for splits, concatenations and flattens."""
    with _lenient_concat_maps():
        tp.dependency.index_mapping.update_index_mapping(graph)


def set_offsets(a: Any, b: Any, slot: int, kind: str, offset: list[int]) -> None:
    """The index map on the dependencies a -> b (forward) and b -> a (reverse) of a `kind` ("split" or "concat")
    at `offset` (start, end); for a concatenation the forward direction is input -> concatenation, for a split
    split -> output."""
    cls = {"split": tp.dependency.index_mapping._SplitIndexMapping, "concat": tp.dependency.index_mapping._ConcatIndexMapping}[kind]
    for dep in a.dependencies:
        if dep.target is b:
            dep.index_mapping[slot] = cls(offset=offset, reverse=False)
    for dep in b.dependencies:
        if dep.target is a:
            dep.index_mapping[slot] = cls(offset=offset, reverse=True)


def set_pair(node: Any, inp: Any, into: Callable | None, back: Callable | None) -> None:
    """The index maps between `node` and its input `inp`: `into` on inp -> node, `back` on node -> inp."""
    for dep in inp.dependencies:
        if dep.target is node:
            dep.index_mapping = [into, None]
    for dep in node.dependencies:
        if dep.target is inp:
            dep.index_mapping = [back, None]


def set_identity(node: Any) -> None:
    """The node passes channels through unchanged: every index map to and from it is the identity."""
    for dep in node.dependencies:
        dep.index_mapping = [None, None]
    for other in list(node.inputs) + list(node.outputs):
        for dep in other.dependencies:
            if dep.target is node:
                dep.index_mapping = [None, None]


def concat_before_split(graph: Any) -> None:
    """Back from a concatenation into a split that feeds it: out of the concatenation first, then into the split
    (Torch-Pruning 1.6 applies the two maps the other way round)."""
    for node in graph.module2node.values():
        for dep in node.dependencies:
            if op_type(node) == "concat" and op_type(dep.target) == "split" and None not in dep.index_mapping:
                dep.index_mapping = [dep.index_mapping[1], dep.index_mapping[0]]


class ChannelBlocks:
    """The index map through a pixel shuffle: with factor f = r * r, channel c on the wide side (C * f channels) is
    pixel c % f of channel c // f on the narrow side. `widen`: narrow -> wide (every position of the block)."""

    def __init__(self, factor: int, widen: bool):
        self.factor, self.widen = factor, widen

    def __call__(self, idxs: list) -> list:
        f = self.factor
        if self.widen:
            return [_HybridIndex(i.idx * f + k, i.root_idx) for i in idxs for k in range(f)]
        return list({(i.idx // f, i.root_idx): _HybridIndex(i.idx // f, i.root_idx) for i in idxs}.values())


class PathSum:
    """The index map of summing paths stacked on dim 1: position k * C + c of the (N, K, C, ...) side is channel c of
    the summed side. `widen`: summed -> stacked (every path's position of the channel)."""

    def __init__(self, paths: int, channels: int, widen: bool):
        self.paths, self.channels, self.widen = paths, channels, widen

    def __call__(self, idxs: list) -> list:
        c = self.channels
        if self.widen:
            return [_HybridIndex(k * c + i.idx, i.root_idx) for i in idxs for k in range(self.paths)]
        return list({(i.idx % c, i.root_idx): _HybridIndex(i.idx % c, i.root_idx) for i in idxs}.values())


def join(graph: Any, a: Any, b: Any) -> None:
    """Dependencies both ways between `a`'s output channels and `b`'s input channels, index for index."""
    out, into = graph.get_pruner_of_module(a.module).prune_out_channels, graph.get_pruner_of_module(b.module).prune_in_channels
    a.dependencies.append(tp.dependency.Dependency(trigger=out, handler=into, source=a, target=b))
    b.dependencies.append(tp.dependency.Dependency(trigger=into, handler=out, source=b, target=a))


def cut(node: Any, others: list) -> None:
    """Remove the dependencies between `node` and each of `others`, both ways."""
    node.dependencies = [d for d in node.dependencies if d.target not in others]
    for other in others:
        other.dependencies = [d for d in other.dependencies if d.target is not node]


# --- following channels ------------------------------------------------------------------------


def coupled(graph: Any, order: dict[str, int], names: dict, heads: set, pinned: set) -> Iterator[dict]:
    """Per producer in forward order (a producer is always the root of its channels, so a depthwise conv after a
    torch.cat never merges two producers' channels), every (node, handler) its out-channels reach, with the
    (index, root index) pairs of every path. Torch-Pruning's get_pruning_group keeps one root index per index,
    which loses couplings such as a GLU gate's (channel i multiplied by channel C + i). Channels that reach a node
    in `pinned` (the token axis, where a token-mixing region hands its output back) are no group."""
    roots = sorted(
        (m for m in graph.module2node if isinstance(m, CONV + CONV_T + (nn.Linear,))), key=lambda m: order.get(names.get(m), 1 << 30)
    )
    visited: set = set()
    # no channel count exceeds all layers' widths together: an index past that is a loop that never closes
    bound = sum(max(p.shape) for p in graph.model.parameters() if p.dim())
    for m in roots:
        if m in heads or m in visited:
            continue
        pruner = graph.get_pruner_of_module(m)
        channels = pruner.get_out_channels(m) if pruner else None
        if channels is None:
            continue
        fn = pruner.prune_out_channels
        if isinstance(m, CONV) and m.groups == m.out_channels > 1:
            fn = tp.function.prune_depthwise_conv_out_channels
        reached = _reach(graph, graph.module2node[m], fn, channels, bound)
        outs = [node.module for (node, handler) in reached if graph.is_out_channel_pruning_fn(handler)]
        visited.update(outs)
        if not any(o in heads or graph.module2node[o] in pinned for o in outs):
            yield reached


def _reach(graph: Any, root: Any, fn: Callable, n: int, bound: int) -> dict:
    """{(node, handler): {(index, root index)}} of every dependency triggered from `root`'s n channels; one
    OtfuseError when an index reaches `bound`."""
    reached = {(root, fn): {(i, i) for i in range(n)}}
    stack = [(root, fn, [_HybridIndex(i, i) for i in range(n)])]
    while stack:
        node, handler, idxs = stack.pop()
        for dep in node.dependencies:
            if not dep.is_triggered_by(handler):
                continue
            new = idxs
            for mapping in dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            fresh = {(int(i.idx), int(i.root_idx)) for i in new} - reached.get((dep.target, dep.handler), set())
            if any(i >= bound for i, _ in fresh):
                raise OtfuseError(
                    f"channel indices grow without end in the traced graph (at {dep.target.name}): an op there mixes the "
                    "channels with another axis (positions, heads) in a way otfuse does not follow, so it cannot permute them exactly"
                )
            if fresh:
                reached.setdefault((dep.target, dep.handler), set()).update(fresh)
                stack.append((dep.target, dep.handler, [_HybridIndex(i, r) for i, r in sorted(fresh)]))
    return reached


# --- pruning (neuron transplantation's way back to one model's width) ---------------------------


def magnitude_pruned(model: nn.Module, x: torch.Tensor, ratio: float, p: int, ignored: list[nn.Module]) -> nn.Module:
    """`model`, pruned in place by Torch-Pruning's magnitude pruner: every channel group cut by the fraction `ratio`,
    the channels of least L`p` norm first; `ignored` layers keep their outputs."""
    check_versions()
    with torch.enable_grad():
        pruner = tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=p), pruning_ratio=ratio, ignored_layers=ignored
        )
        pruner.step()
    return model


def pruned_channels(model: nn.Module, x: torch.Tensor, drops: dict[str, list[int]]) -> nn.Module:
    """`model` with, per producer layer named in `drops`, those output channels removed in place, every layer and
    tensor coupled to them with them (Torch-Pruning's pruning groups, traced on `x`): a model of other widths per
    channel group, whose weights the caller then overwrites."""
    check_versions()
    layers = dict(model.named_modules())
    with torch.enable_grad(), quiet():
        graph = tp.DependencyGraph().build_dependency(model, x, verbose=False)
        for name, idxs in drops.items():
            if idxs:
                layer = layers[name]
                fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels
                graph.get_pruning_group(layer, fn, idxs=sorted(idxs)).prune()
    return model.eval()


def flops(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `x` (Torch-Pruning's count, dense: zeros count)."""
    with torch.no_grad():
        return int(tp.utils.count_ops_and_params(model, x)[0])
