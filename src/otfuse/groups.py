"""Channel groups found by Torch-Pruning's DepGraph, and exact permutation of them.

    groups = channel_groups(model, example_input)      # forward order, classifier outputs excluded
    per_model = groups_of([model_a, model_b], images, norm)   # checked to have the same structure

A group is a set of channels that must move together: a conv's outputs, the BatchNorm after
it, the next convs' inputs, every tensor tied by a residual addition, the slices a torch.cat
splices into its consumers. Each member names a tensor, an axis and, per group channel, the
indices of that axis that belong to it (several for a Linear after a flatten, or for the two
halves of a GLU gate that multiply each other).

Channels that reach different consumers (a `split`, `chunk` or slice along the channel axis, a
residual added to some channels only) form one group per part: a part's channels move among
themselves. Channels viewed as units of K and reduced over the unit (maxout: a view as (N, U, K, ...) and a
max over dim 2) move as whole units: a group channel is a unit, K positions. A GroupNorm's channels move
within their norm group (or whole norm groups move), as a grouped conv's do. Parametrised weights
(`torch.nn.utils.parametrize`: weight_norm, spectral_norm, any parametrisation that commutes with permuting
channels) are carried through the tensors the model stores; the old `torch.nn.utils.weight_norm` is refused by
name. `otfuse.maps.channel_groups` checks the result numerically: a grouping that does not permute exactly is refused, never returned.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize
from torch_pruning import ops as tp_ops
from torch_pruning._helpers import _HybridIndex

from otfuse.attention import Attention, attention_layers, leaf_pruners, traced_as_leaves
from otfuse.data import normalize
from otfuse.einsum import EinsumSite, einsum_sites, traced_as_linears, translated
from otfuse.errors import OtfuseError
from otfuse.hooks import tapping

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
INSTANCENORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
CHANNEL_SHUFFLES = {"ChannelShuffleBackward0": "channel_shuffle"}
# what the grouping is tested with: it reads Torch-Pruning's internals and torch's autograd graph, which other
# releases change; OTFUSE_UNTESTED_VERSIONS=1 runs it anyway (to try an upgrade), with one warning
# Torch-Pruning's index-map builder and DependencyGraph._detect_unwrapped_parameters are patched while a graph is
# built (they are module and class attributes: every thread sees them); one build at a time keeps another thread's
# build on the originals, and the originals put back whatever order the threads finish in
_TP_PATCH = threading.RLock()
TORCH_PRUNING = "1.6.1"
TORCH_RANGE = ((2, 11), (2, 14))  # first and last minor release tested, bounds included


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


@dataclass
class Member:
    """One tensor axis in a group: `index[c]` are the positions on `axis` that carry group channel c."""

    module: str
    tensor: str
    axis: int
    index: torch.Tensor  # (size, m) long
    role: str  # "out": produces the channels, "in": consumes them (conv/linear input axis)
    kind: str = "layer"  # "layer" (conv, linear), "norm" (BatchNorm, GroupNorm, LayerNorm) or "other"
    conv_groups: int = 1  # a grouped conv's weight: read and written as its dense block-diagonal form


@dataclass
class Observation:
    """Where a group's channels can be seen: the input (after the nonlinearity) or the output
    (before it) of `module`, at `index` of dim 1."""

    module: str
    index: torch.Tensor  # (size, m) long
    on: str = "input"  # "input": read by a consumer; "output": written by a producer
    axis: int = 1  # the channel axis of that tensor: 1 (N, C, ...) or -1 (channels last: a Linear's input, a LayerNorm's output)
    through: tuple[str, str] = ("", "")  # a weight (and bias) applied to that tensor first: the channels are its rows
    foldable: bool = True  # REPAIR may rescale the channels here: not q and k, whose scale is the attention's sharpness
    unordered: int = 0  # an axis whose order differs between models (the channels, at a token layer): sorted before comparing


@dataclass
class ChannelGroup:
    name: str
    size: int
    members: list[Member]
    observations: list[Observation] = field(default_factory=list)  # consumer inputs: after the nonlinearity
    pre_observations: list[Observation] = field(default_factory=list)  # norm (else layer) outputs: before it
    order: int = 0  # position of the first producer in the forward pass
    blocks: torch.Tensor | None = None  # per channel, its block of a grouped conv: channels move within blocks, blocks as a whole
    family: str = ""  # groups whose blocks must move alike (linked by grouped convs): the first such conv's name
    pinned: bool = False  # its blocks stay where they are (channels still move within them): see _link_blocks
    norm_blocks: dict[str, list[list[int]]] = field(default_factory=dict)  # per GroupNorm: each channel's positions in it
    attention: Attention | None = None  # the attention layer whose inner channels these are
    layout: str = ""  # and how they pair up there (one of LAYOUTS)

    def signature(self) -> tuple:
        return (self.name, self.size, tuple((m.module, m.tensor, m.axis, tuple(m.index.shape)) for m in self.members))


# --- finding groups --------------------------------------------------------------------------


def find_groups(model: nn.Module, example_input: torch.Tensor, time_limit: float = 300.0) -> list[ChannelGroup]:
    """Every permutable channel group of `model`, in forward order; the logits are never grouped.
    Not checked numerically: `otfuse.maps.channel_groups` is this plus that check.

    The model is traced in eval mode (a trace must not move BatchNorm statistics) on `example_input`,
    moved to the model's device. Anything otfuse cannot permute exactly is one OtfuseError naming it,
    and so is a grouping that takes longer than `time_limit` seconds (0: no limit; the limit needs
    the main thread)."""
    check_versions()
    was_training = model.training
    order: dict[str, int] = {}
    layers: list[nn.Module] = []

    def seen(name: str, module: nn.Module):
        def fn(_out):
            order.setdefault(name, len(order))
            if isinstance(module, CONV + CONV_T + (nn.Linear,)):
                layers.append(module)

        return fn

    params = list(model.parameters())
    if not params:
        raise OtfuseError(f"the model ({type(model).__name__}) has no parameters; nothing to align")
    _refuse_old_weight_norm(model)
    _refuse_recurrent(model)
    attention = attention_layers(model)
    example_input = example_input.to(params[0].device)
    maps = _channel_first_maps(model, example_input)
    sites = einsum_sites(model, example_input, tuple(attention))
    # one forward pass serves both: Torch-Pruning's trace, and our forward order (einsums' stand-ins included)
    taps = lambda: [(n, "output", seen(n, m)) for n, m in model.named_modules() if n]
    try:
        model.eval()
        with (
            traced_as_linears(model, sites) as stand_ins,
            tapping(model, taps()),
            traced_as_leaves(model, attention),
            torch.enable_grad(),
            _lenient_concat_maps(),
            _parameters_on_channels(maps),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", module="torch_pruning")  # its shape inference's depth notices: not the user's concern
            graph = tp.DependencyGraph().build_dependency(
                model, example_input, verbose=False, customized_pruners=leaf_pruners(model, attention)
            )
    except OtfuseError:
        raise
    except Exception as exc:  # a forward pass that fails, or a trace Torch-Pruning cannot follow
        raise OtfuseError(_trace_failure(model, example_input, exc)) from None
    finally:
        model.train(was_training)
    if not layers:
        raise OtfuseError("the model has no conv or linear layer; nothing to align")
    heads = _heads(graph) | {layers[-1]}  # the last layer run produces the logits; a model may have more outputs
    names = {m: n for n, m in model.named_modules()} | stand_ins
    params_by_id = {id(p): n for n, p in model.named_parameters()}
    unwrapped = {id(p): dim for p, dim in getattr(graph, "unwrapped_parameters", [])}
    try:
        with _TP_PATCH, _time_limited(time_limit), warnings.catch_warnings():  # the lock: warning filters are process-wide too
            warnings.filterwarnings("ignore", module="torch_pruning")
            _repair_index_maps(graph, tokens=bool(attention))
            last, mixing = _cut_token_mixing(graph)
            groups = [
                g
                for items in _coupled(graph, order, names, heads, last)
                for g in _to_groups(items, names, order, params_by_id, unwrapped, attention, sites)
            ]
            for obs in (o for g in groups for o in g.observations + g.pre_observations if o.module in mixing):
                obs.unordered = 1  # a token layer's (batch, channels, tokens) map: each model has its own channel order
    except _OutOfTime:
        raise OtfuseError(
            f"Torch-Pruning's DepGraph did not finish grouping {type(model).__name__}'s channels in {time_limit:.0f} s "
            f"(on an input of shape {tuple(example_input.shape)}, its index mappings through reshapes and "
            "window partitions grow with the feature maps); give a smaller example input or a larger time_limit"
        ) from None
    except OtfuseError as exc:
        raise OtfuseError(channel_rearrangement(model, example_input) or str(exc)) from None
    except Exception as exc:  # Torch-Pruning's own failure on a layout it cannot index
        raise OtfuseError(_trace_failure(model, example_input, exc)) from None
    groups += [g for spec in attention.values() for g in _head_groups(spec, order)]
    groups.sort(key=lambda g: (g.order, g.name))
    _link_blocks(model, groups)
    _refuse_tied(model, groups)
    _say_uncovered(model, groups, {names[m] for m in heads} | mixing)
    return groups


def _refuse_tied(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """One error for a layer whose output channels the trace tied into a single group channel: nothing would align
    them, silently (Torch-Pruning 1.6 ties every channel of two tensors multiplied over their channel axis)."""
    for g in groups:
        tied = [m for m in g.members if m.role == "out" and m.kind == "layer" and m.tensor == "weight" and m.index.shape[1] > 1]
        if g.size == 1 and tied:
            raise OtfuseError(
                f"{type(model).__name__}: the {tied[0].index.shape[1]} output channels of {tied[0].module} are tied into one "
                "by an operation otfuse does not follow (two tensors multiplied over their channels, such as "
                "softmax(q k^T) built from two convolutions); otfuse refuses it rather than leave them unaligned"
            )


def _say_uncovered(model: nn.Module, groups: list[ChannelGroup], exempt: set[str]) -> None:
    """One warning naming the weights no group reaches, outside the heads and the token-mixing layers (whose features
    no permutation moves): fusion averages them as they stand, wrong where their channels did move."""
    covered = {f"{m.module}.{m.tensor}".lstrip(".") for g in groups for m in g.members}
    missed = [n for n, p in model.named_parameters() if p.dim() >= 2 and n not in covered and n.rpartition(".")[0] not in exempt]
    if missed:
        warnings.warn(
            f"{type(model).__name__}: {', '.join(missed[:4])}{' and more' if len(missed) > 4 else ''} belong to no channel "
            "group, so fusion averages them as they stand, unaligned; one cause is a layer called through "
            "torch.nn.functional with its own tensors, which the grouping cannot see: make it an nn.Conv2d or nn.Linear module",
            stacklevel=3,
        )


def _refuse_old_weight_norm(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if any(type(h).__name__ == "WeightNorm" for h in mod._forward_pre_hooks.values()):
            raise OtfuseError(
                f"module {name} uses the deprecated torch.nn.utils.weight_norm, whose weight is recomputed in "
                "every forward pass and cannot be copied exactly; use torch.nn.utils.parametrizations.weight_norm "
                "(the same function, supported) or torch.nn.utils.remove_weight_norm before fusing"
            )


def _refuse_recurrent(model: nn.Module) -> None:
    # a recurrent layer's hidden channels feed back into themselves, gates packed in one weight: the trace
    # of an unrolled loop never closes (Torch-Pruning's split offsets grow at every time step)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.RNNBase):
            raise OtfuseError(
                f"module {name} ({type(mod).__name__}) holds tensors in a channel group and otfuse cannot "
                "permute it exactly (recurrent layers are not supported)"
            )


class _OutOfTime(BaseException):  # not an Exception: library code that catches those must not swallow it
    pass


@contextmanager
def _time_limited(seconds: float) -> Iterator[None]:
    """Raise _OutOfTime in the block after `seconds` (wall clock), where a signal can reach it: the main thread."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(_signum, _frame):
        raise _OutOfTime()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _trace_failure(model: nn.Module, x: torch.Tensor, exc: Exception) -> str:
    """One line for a model that cannot be traced: its forward pass fails, or DepGraph cannot follow it."""
    first = " ".join(str(exc).split()[:16]) or type(exc).__name__
    try:
        with torch.no_grad():
            model(x)
    except Exception as forward:
        why = " ".join(str(forward).split()[:16]) or type(forward).__name__
        return f"the model cannot run on an example of shape {tuple(x.shape)} ({type(forward).__name__}: {why}); give an input it accepts"
    return channel_rearrangement(model, x) or (
        f"Torch-Pruning's DepGraph cannot trace {type(model).__name__}: {type(exc).__name__}: "
        f"{first}; otfuse cannot find its channel groups"
    )


def channel_rearrangement(model: nn.Module, x: torch.Tensor) -> str:
    """The refusal for an op that moves channels otfuse does not follow (a channel shuffle: a view of the channels
    as (groups, channels / groups), transposed), or "" when the model has none."""
    with torch.enable_grad():
        try:
            out = model(x)
        except Exception:
            return ""
    consumer: dict = {}  # backward node -> the node that used its output (the step after it in the forward pass)
    seen, todo = set(), [out.grad_fn] if isinstance(out, torch.Tensor) else []
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if type(f).__name__ in CHANNEL_SHUFFLES:
            return (
                f"{type(model).__name__} uses {CHANNEL_SHUFFLES[type(f).__name__]}, which interleaves the channels of its "
                "groups, so no permutation of one group keeps the function; otfuse refuses it rather than fuse it wrongly"
            )
        if type(f).__name__ == "TransposeBackward0" and {f._saved_dim0, f._saved_dim1} == {1, 2} and _is_shuffle(f, consumer):
            return (
                f"{type(model).__name__} shuffles channels (view as groups, transpose(1, 2), view back): the shuffle "
                "interleaves the channels of two branches, so no permutation of one branch keeps the function; "
                "otfuse refuses it rather than fuse it wrongly"
            )
        for n, _ in f.next_functions:
            if n is not None:
                consumer.setdefault(n, f)
                todo.append(n)
    return ""


def _sizes(f) -> tuple:
    """The input sizes a view/reshape backward node saved (empty for any other node)."""
    named = type(f).__name__
    return tuple(getattr(f, "_saved_self_sym_sizes", ())) if "View" in named or "Reshape" in named else ()


def _is_shuffle(transpose, consumer: dict) -> bool:
    """Whether a transpose(1, 2) sits between a view of an (N, C, H, W) map as (N, g, C / g, H, W) and a view
    back to four dimensions: not attention's (batch, tokens, dim) views, nor a flatten(2).transpose(1, 2)."""
    before = transpose.next_functions[0][0]
    after = consumer.get(transpose)
    while after is not None and type(after).__name__ == "CloneBackward0":  # .contiguous() before the view back
        after = consumer.get(after)
    return len(_sizes(before)) == 4 and after is not None and len(_sizes(after)) == 5


@contextmanager
def _patched(owner: object, attr: str, make: Callable) -> Iterator[None]:
    """`owner.attr` replaced by `make(original)` in the block, under the one lock for Torch-Pruning's patches: the
    original is read under it too, so it is never another thread's patch, and it is always put back."""
    with _TP_PATCH:
        original = getattr(owner, attr)
        setattr(owner, attr, make(original))
        try:
            yield
        finally:
            setattr(owner, attr, original)


def _lenient_concat_maps():
    """Let Torch-Pruning 1.6 finish building a graph with a concatenation it cannot size (DPN, CSP-Darknet: its
    own TypeError, summing a None); `_repair_index_maps` then sizes it from the autograd graph."""

    def lenient(original: Callable) -> Callable:
        def update(graph, node):
            try:
                original(graph, node)
            except TypeError:
                pass

        return update

    return _patched(tp.dependency.index_mapping, "update_concat_index_mapping", lenient)


def _repair_index_maps(graph: tp.DependencyGraph, tokens: bool = False) -> None:
    """Torch-Pruning's index maps, with those of splits and concatenations along channels redone from the autograd
    graph. Torch-Pruning 1.6 pairs a split's outputs and a concatenation's inputs with offsets in the order it
    found them (a split's parts land on the wrong consumers), sizes a chunk's parts by guessing, and drops a
    concatenation's offsets when a slice follows it. Where the autograd graph is ambiguous (one op reading two
    parts of one split, a concatenation of a constant or of one tensor twice) Torch-Pruning's maps stand and the
    exactness check guards them."""
    with _lenient_concat_maps():
        tp.dependency.index_mapping.update_index_mapping(graph)
    mapping = tp.dependency.index_mapping
    for node in graph.module2node.values():
        fn = node.grad_fn
        dim = None if fn is None else _channel_dim(fn, tokens)
        if dim is None:
            continue
        if node.type == tp_ops.OPTYPE.SPLIT:
            offsets = _offsets([m.shape[dim] for m in fn._input_metadata])
            for out in node.outputs:
                nrs = [i for f, i in getattr(out.grad_fn, "next_functions", ()) if f is fn]
                if len(nrs) == 1:
                    _set_map(node, out, 0, mapping._SplitIndexMapping, offsets[nrs[0] : nrs[0] + 2])
        elif node.type == tp_ops.OPTYPE.CONCAT:
            producers = [f for f, _ in fn.next_functions]
            if None in producers or len({id(f) for f in producers}) != len(producers):
                continue
            offsets = _offsets([int(_output_shape(f, i)[dim]) for f, i in fn.next_functions])
            for k, f in enumerate(producers):
                for inp in [n for n in node.inputs if n.grad_fn is f]:
                    _set_map(inp, node, 1, mapping._ConcatIndexMapping, offsets[k : k + 2])
    for node in graph.module2node.values():
        _map_pixel_shuffle(node)
        _map_paths(node, mapping)
        if tokens and (_joins_tokens(node) or _slices_space(node)):
            _set_identity(node)
        elif tokens:
            _map_merge_into_channels(node)
    for node in graph.module2node.values():
        _map_channel_units(node)  # after the views it reads were mapped
        _cut_broadcast(node)
    for node in graph.module2node.values():
        for dep in node.dependencies:
            if node.type == tp_ops.OPTYPE.CONCAT and dep.target.type == tp_ops.OPTYPE.SPLIT and None not in dep.index_mapping:
                # back from a concatenation into a split that feeds it: out of the concatenation first, then into the split
                dep.index_mapping = [dep.index_mapping[1], dep.index_mapping[0]]


def _channel_dim(fn, tokens: bool) -> int | None:
    """The dim a split or concatenation acts on when it is the channels' (None otherwise): dim 1, or in a model with
    attention layers the last dim of a channels-last tensor (Swin's patch merging joins four slices there)."""
    dim = getattr(fn, "_saved_dim", None)
    if not isinstance(dim, int):
        return None
    if dim >= 1 << 63:  # autograd saves a negative dim as its unsigned 64-bit value
        dim -= 1 << 64
    if dim == 1:
        return 1
    meta = getattr(fn, "_input_metadata", None) or ()
    ndim = len(meta[0].shape) if meta else 0
    return dim % ndim if tokens and ndim >= 3 and dim % ndim == ndim - 1 else None


def _joins_tokens(node) -> bool:
    """A concatenation of (batch, tokens, channels) tensors along a dim before the channels."""
    fn = node.grad_fn
    if node.type != tp_ops.OPTYPE.CONCAT or fn is None or not getattr(fn, "_input_metadata", None):
        return False
    ndim = len(fn._input_metadata[0].shape)
    return ndim == 3 and getattr(fn, "_saved_dim", -1) % ndim != ndim - 1


def _slices_space(node) -> bool:
    """A slice of a channels-last (batch, height, width, channels) map along height or width (Swin's patch merging
    takes every other row and column), which Torch-Pruning 1.6 takes for a slice of channels on dim 1."""
    fn = node.grad_fn
    if node.type != tp_ops.OPTYPE.SLICE or fn is None:
        return False
    sizes, dim = tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ())), getattr(fn, "_saved_dim", None)
    return len(sizes) == 4 and dim in (1, 2) and sizes[1] == sizes[2] != sizes[3]


def _map_merge_into_channels(node) -> None:
    """A reshape of a channels-last map (..., a, b, C) -> (..., a * b * C) (timm's Swin patch merging folds each 2 x 2
    neighbourhood into the channels): channel c becomes positions k * C + c, which Torch-Pruning 1.6 maps as c. Two
    dims or more are folded: one folded dim is an attention layer's heads joined inside it, which is not the stream's."""
    fn = node.grad_fn
    if node.type != tp_ops.OPTYPE.RESHAPE or fn is None or not getattr(fn, "_input_metadata", None):
        return
    before = tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ()))
    after = tuple(int(v) for v in fn._input_metadata[0].shape)
    if len(before) < len(after) + 2 or len(after) < 2 or before[: len(after) - 1] != after[:-1] or after[-1] % before[-1]:
        return
    if min(before[len(after) - 1 :]) == 1:  # a flatten of (N, C, 1, 1): singleton dims fold nothing into the channels
        return
    _set_path_sum(node, after[-1] // before[-1], before[-1], into_node_widens=True)


def _set_path_sum(node, paths: int, channels: int, into_node_widens: bool) -> None:
    """Index maps between `node` and its inputs: K paths of C channels on one side, their sum on the other."""
    for inp in node.inputs:
        for dep in inp.dependencies:
            if dep.target is node:
                dep.index_mapping = [_PathSum(paths, channels, widen=into_node_widens), None]
        for dep in node.dependencies:
            if dep.target is inp:
                dep.index_mapping = [_PathSum(paths, channels, widen=not into_node_widens), None]


def _set_identity(node) -> None:
    """The node passes channels through unchanged: every index map to and from it is the identity."""
    for dep in node.dependencies:
        dep.index_mapping = [None, None]
    for other in list(node.inputs) + list(node.outputs):
        for dep in other.dependencies:
            if dep.target is node:
                dep.index_mapping = [None, None]


class _ChannelBlocks:
    """The index map through a pixel shuffle: with factor f = r * r, channel c on the wide side (C * f channels) is
    pixel c % f of channel c // f on the narrow side. `widen`: narrow -> wide (every position of the block)."""

    def __init__(self, factor: int, widen: bool):
        self.factor, self.widen = factor, widen

    def __call__(self, idxs: list) -> list:
        f = self.factor
        if self.widen:
            return [_HybridIndex(i.idx * f + k, i.root_idx) for i in idxs for k in range(f)]
        return list({(i.idx // f, i.root_idx): _HybridIndex(i.idx // f, i.root_idx) for i in idxs}.values())


def _map_pixel_shuffle(node) -> None:
    """Give a pixel shuffle (C * r * r channels -> C) or unshuffle (C -> C * r * r) node, which Torch-Pruning 1.6 takes
    for an elementwise op, the index map it defines; the node's own index space is its output's channels."""
    name = type(node.grad_fn).__name__
    if name not in ("PixelShuffleBackward0", "PixelUnshuffleBackward0"):
        return
    shuffle = name == "PixelShuffleBackward0"
    factor = int(getattr(node.grad_fn, "_saved_upscale_factor" if shuffle else "_saved_downscale_factor")) ** 2
    for inp in node.inputs:  # input -> node: narrow to the output's channels (shuffle) or widen (unshuffle), and back
        for dep in inp.dependencies:
            if dep.target is node:
                dep.index_mapping = [_ChannelBlocks(factor, widen=not shuffle), None]
        for dep in node.dependencies:
            if dep.target is inp:
                dep.index_mapping = [_ChannelBlocks(factor, widen=shuffle), None]


BROADCASTS = ("MulBackward0", "AddBackward0", "SubBackward0", "DivBackward0")


def _cut_broadcast(node) -> None:
    """An elementwise op of a one-channel tensor with a tensor of C channels (a separable self-attention's context
    scores times its keys, a spatial attention map times its features) broadcasts the one channel over all C: no
    channel of one is a channel of the other. Torch-Pruning 1.6 couples them as if they were the same channels, which
    ties the C channels into one; the one-channel side is cut off (a group of its own)."""
    fn = node.grad_fn
    if fn is None or type(fn).__name__ not in BROADCASTS or len(fn.next_functions) != 2 or None in (f for f, _ in fn.next_functions):
        return
    shapes = [_output_shape(f, i) for f, i in fn.next_functions]
    if any(len(sh) < 3 for sh in shapes) or len({len(sh) for sh in shapes}) != 1:
        return
    channels = [int(sh[1]) for sh in shapes]
    if sorted(channels)[0] != 1 or max(channels) == 1:
        return
    small = fn.next_functions[channels.index(1)][0]
    _cut(node, [n for n in node.inputs if n.grad_fn is small])


UNIT_REDUCTIONS = ("AmaxBackward0", "AminBackward0", "MaxBackward0", "MinBackward0", "SumBackward1", "MeanBackward1")


def _unit_size(fn) -> int:
    """K when `fn` reduces dim 2 of a view of (N, U * K, ...) channels as (N, U, K, ...): channels made of units of K
    (maxout); 0 for any other node."""
    if type(fn).__name__ not in UNIT_REDUCTIONS:
        return 0
    dims = getattr(fn, "_saved_dim", None)
    dims = tuple(dims) if isinstance(dims, tuple | list) else (dims,)
    sizes = tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ())) or tuple(getattr(getattr(fn, "_saved_self", None), "shape", ()))
    if len(dims) != 1 or not isinstance(dims[0], int) or len(sizes) < 3:
        return 0
    dim = (dims[0] - (1 << 64) if dims[0] >= 1 << 63 else dims[0]) % len(sizes)
    view = fn.next_functions[0][0]
    if dim != 2 or view is None or not _sizes(view):
        return 0
    before = _sizes(view)
    split = before[:1] + (sizes[1] * sizes[2],) + before[2:] == (sizes[0], sizes[1] * sizes[2]) + sizes[3:]
    return sizes[2] if split and len(before) == len(sizes) - 1 else 0


def _map_channel_units(node) -> None:
    """A reduction over units of K channels viewed as (N, U, K, ...) (maxout, a mean over channel pairs): position
    u * K + k of the view's input is unit u of the output, the index map of a pixel shuffle; the view itself keeps
    the flattened channel order. Torch-Pruning 1.6 takes the reduction for an elementwise op."""
    k = _unit_size(node.grad_fn) if node.grad_fn is not None else 0
    if k <= 1:
        return
    for inp in node.inputs:
        if inp.grad_fn is node.grad_fn.next_functions[0][0]:
            _set_identity(inp)
    for inp in node.inputs:
        for dep in inp.dependencies:
            if dep.target is node:
                dep.index_mapping = [_ChannelBlocks(k, widen=False), None]
        for dep in node.dependencies:
            if dep.target is inp:
                dep.index_mapping = [_ChannelBlocks(k, widen=True), None]


class _PathSum:
    """The index map of summing paths stacked on dim 1: position k * C + c of the (N, K, C, ...) side is channel c of
    the summed side. `widen`: summed -> stacked (every path's position of the channel)."""

    def __init__(self, paths: int, channels: int, widen: bool):
        self.paths, self.channels, self.widen = paths, channels, widen

    def __call__(self, idxs: list) -> list:
        c = self.channels
        if self.widen:
            return [_HybridIndex(k * c + i.idx, i.root_idx) for i in idxs for k in range(self.paths)]
        return list({(i.idx % c, i.root_idx): _HybridIndex(i.idx % c, i.root_idx) for i in idxs}.values())


def _map_paths(node, mapping) -> None:
    """Selective-kernel and split-attention blocks (SKNet, ResNeSt) stack K paths of C channels on a new dim 1, view
    an attention of K * C channels as (K, C), and sum over the paths. Their channel index is K * C flattened: a stack
    is a concatenation, a view that keeps the trailing (spatial) dims, or whose channels carry no spatial extent,
    changes nothing, and a sum over dim 1 of a 5-D tensor maps k * C + c to c. Torch-Pruning 1.6 takes the stack and
    the sum for elementwise ops and a view for a flatten."""
    fn, name = node.grad_fn, type(node.grad_fn).__name__
    if name == "StackBackward0" and fn._saved_dim == 1:
        producers = [f for f, _ in fn.next_functions]
        if None in producers or len({id(f) for f in producers}) != len(producers):
            return
        shapes = [_output_shape(f, i) for f, i in fn.next_functions]
        if any(len(sh) < 3 for sh in shapes):
            return
        offsets = _offsets([int(sh[1]) for sh in shapes])
        for k, f in enumerate(producers):
            for inp in [n for n in node.inputs if n.grad_fn is f]:
                _set_map(inp, node, 1, mapping._ConcatIndexMapping, offsets[k : k + 2])
    elif name == "SumBackward1" and tuple(fn._saved_dim) == (1,) and len(fn._saved_self_sym_sizes) == 5 and not fn._saved_keepdim:
        _set_path_sum(node, int(fn._saved_self_sym_sizes[1]), int(fn._saved_self_sym_sizes[2]), into_node_widens=False)
    elif node.type == tp_ops.OPTYPE.RESHAPE and _keeps_channel_order(fn):
        _set_identity(node)


def _keeps_channel_order(fn) -> bool:
    """Whether a view/reshape only regroups the channel dims: it keeps 2 trailing spatial dims (N, K * C, H, W) <->
    (N, K, C, H, W), or its channels carry no spatial extent (per sample as many values as the conv above has channels)."""
    before = tuple(int(v) for v in getattr(fn, "_saved_self_sym_sizes", ()))
    after = tuple(int(v) for v in fn._input_metadata[0].shape) if getattr(fn, "_input_metadata", None) else ()
    if len(before) < 2 or len(after) < 2 or before[0] != after[0] or _prod(before[1:]) != _prod(after[1:]):
        return False
    if len(before) >= 4 and len(after) >= 4 and before[-2:] == after[-2:] and (len(before) == 5) != (len(after) == 5):
        return True
    channels = _channels_above(fn)
    return channels is not None and channels == _prod(before[1:]) and max(len(before), len(after)) >= 4


def _channels_above(fn, depth: int = 12) -> int | None:
    """The output channels of the nearest conv above `fn` through parameter-free, shape-keeping ops (None: none found)."""
    for _ in range(depth):
        nxt = [f for f, _ in fn.next_functions if f is not None and type(f).__name__ != "AccumulateGrad"]
        if len(nxt) != 1:
            return None
        fn = nxt[0]
        if type(fn).__name__ == "ConvolutionBackward0":
            return int(fn._input_metadata[0].shape[1])
    return None


def _prod(dims: tuple) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + int(n))
    return out


def _set_map(a, b, slot: int, kind, offset: list[int]) -> None:
    """Set the index map on the dependencies a -> b (forward) and b -> a (reverse); for a concatenation the forward
    direction is input -> concatenation, for a split split -> output."""
    for dep in a.dependencies:
        if dep.target is b:
            dep.index_mapping[slot] = kind(offset=offset, reverse=False)
    for dep in b.dependencies:
        if dep.target is a:
            dep.index_mapping[slot] = kind(offset=offset, reverse=True)


def _output_shape(fn, nr: int) -> torch.Size:
    """The shape of output `nr` of the forward op behind autograd node `fn` (a leaf's own shape)."""
    if hasattr(fn, "variable"):
        return fn.variable.shape
    return fn._input_metadata[nr].shape


def _heads(graph: tp.DependencyGraph) -> set[nn.Module]:
    """The layers whose outputs reach the model's outputs through no other layer (a classifier, each head of a model
    with several outputs): their output features are the outputs, never permuted."""
    layer = lambda node: isinstance(node.module, CONV + CONV_T + (nn.Linear,))
    heads = set()
    for node in (n for n in graph.module2node.values() if layer(n)):
        seen, todo = set(), list(node.outputs)
        while todo and not layer(todo[-1]):
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(n.outputs)
        if not todo:
            heads.add(node.module)
    return heads


def _channel_first_maps(model: nn.Module, x: torch.Tensor) -> set[int]:
    """The ids of (1, C, H, W) parameters added to or multiplied with a conv's (N, C, H, W) output (a learned position
    map): their channels are on dim 1, where Torch-Pruning 1.6 would take the last dim."""
    candidates = {id(p) for p in model.parameters() if p.dim() == 4 and p.shape[0] == 1 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1}
    if not candidates:
        return set()
    was_training = model.training
    try:
        with torch.enable_grad():
            out = model.eval()(x)
    except Exception:
        return set()  # the trace that follows says what fails
    finally:
        model.train(was_training)
    found, seen = set(), set()
    todo = [t.grad_fn for t in (out if isinstance(out, tuple | list) else [out]) if isinstance(t, torch.Tensor)]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        inputs = [f for f, _ in fn.next_functions if f is not None]
        held = [id(f.variable) for f in inputs if type(f).__name__ == "AccumulateGrad" and id(f.variable) in candidates]
        if held and any(_from_conv(f) for f in inputs if type(f).__name__ != "AccumulateGrad"):
            found.update(held)
        todo.extend(inputs)
    return found


def _from_conv(fn, depth: int = 8) -> bool:
    """Whether a tensor comes from a convolution through elementwise steps (no reshape, transpose or linear layer)."""
    for _ in range(depth):
        name = type(fn).__name__
        if name.startswith(("Convolution", "CudnnConvolution", "MkldnnConvolution")):
            return True
        if any(k in name for k in ("View", "Reshape", "Transpose", "Permute", "Addmm", "Mm", "LayerNorm")) or not fn.next_functions:
            return False
        fn = fn.next_functions[0][0]
        if fn is None:
            return False
    return False


def _parameters_on_channels(maps: set[int]):
    """Torch-Pruning 1.6 with the parameters in `maps` coupled to channels on dim 1."""

    def coupled(original: Callable) -> Callable:
        def detect(self, unwrapped_parameters):
            names, found = original(self, unwrapped_parameters)
            return names, [type(u)(parameters=u.parameters, pruning_dim=1 if id(u.parameters) in maps else u.pruning_dim) for u in found]

        return detect

    return _patched(tp.DependencyGraph, "_detect_unwrapped_parameters", coupled)


def _swaps_last_two(fn) -> bool:
    """A transpose or permute of a (batch, a, b) tensor that swaps its last two dims."""
    meta = getattr(fn, "_input_metadata", None) or ()
    if len(meta) != 1 or len(meta[0].shape) != 3:
        return False
    if type(fn).__name__ == "TransposeBackward0":
        dims = {(d - (1 << 64) if d >= 1 << 63 else d) % 3 for d in (fn._saved_dim0, fn._saved_dim1)}
        return dims == {1, 2}
    return type(fn).__name__ == "PermuteBackward0" and tuple(d % 3 for d in fn._saved_dims) == (0, 2, 1)


def _cut_token_mixing(graph: tp.DependencyGraph) -> tuple[set, set[str]]:
    """Take each token-mixing region out of the channels' graph; return the nodes that hand its output back and the
    names of the modules inside. A region
    (MLP-Mixer's token MLP, ResMLP's token layer, gMLP's spatial gate) starts at a swap of a (batch, tokens, channels)
    tensor's last two dims and ends at the swaps back; inside, every layer acts along the tokens, the same way for
    each channel. So a channel permutation passes through it unchanged: the swaps are joined directly (channel i in,
    channel i out), the layers inside belong to no channel group (Torch-Pruning 1.6 couples their token features to
    the channels), their hidden units form groups of their own, and the tokens stay where the patches put them."""
    swaps = {n for n in graph.module2node.values() if n.grad_fn is not None and _swaps_last_two(n.grad_fn)}
    last: set = set()
    mixing: set[str] = set()
    for entry in swaps:
        region = _token_region(entry, swaps)
        if region is None:
            continue
        inside, ends = region
        mixing.update(n._name for n in inside if n._name and isinstance(n.module, nn.Linear | nn.LayerNorm))
        _cut(entry, [n for n in entry.outputs if n in inside])
        for end in ends:
            before = [n for n in end.inputs if n in inside]
            _cut(end, before)
            last.update(before)
            _join(graph, entry, end)
    return last, mixing


def _token_region(entry, swaps: set) -> tuple[set, set] | None:
    """(the nodes between `entry` and the swaps back, those swaps) when every path from `entry` ends at a swap back,
    no other data joins on the way and a linear layer acts along the tokens; else None."""
    inside, ends, todo = set(), set(), list(entry.outputs)
    while todo:
        node = todo.pop()
        if node in inside or node in ends:
            continue
        if node in swaps:
            ends.add(node)
            continue
        if not node.outputs or node.type == tp_ops.OPTYPE.OUTPUT:
            return None
        inside.add(node)
        todo.extend(node.outputs)
    # a node without inputs of its own (the transpose of a layer's weight) carries no data from elsewhere
    joined = any(i is not entry and i not in inside and i.inputs for n in inside | ends for i in n.inputs)
    linear = any(isinstance(n.module, nn.Linear) for n in inside)
    return None if joined or not linear or not ends else (inside, ends)


def _join(graph: tp.DependencyGraph, a, b) -> None:
    """Dependencies both ways between `a`'s output channels and `b`'s input channels, index for index."""
    out, into = graph.get_pruner_of_module(a.module).prune_out_channels, graph.get_pruner_of_module(b.module).prune_in_channels
    a.dependencies.append(tp.dependency.Dependency(trigger=out, handler=into, source=a, target=b))
    b.dependencies.append(tp.dependency.Dependency(trigger=into, handler=out, source=b, target=a))


def _cut(node, others: list) -> None:
    """Remove the dependencies between `node` and each of `others`, both ways."""
    node.dependencies = [d for d in node.dependencies if d.target not in others]
    for other in others:
        other.dependencies = [d for d in other.dependencies if d.target is not node]


def _coupled(graph: tp.DependencyGraph, order: dict[str, int], names: dict, heads: set, pinned: set) -> Iterator[dict]:
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


def _reach(graph: tp.DependencyGraph, root, fn, n: int, bound: int) -> dict:
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
                    f"channel indices grow without end around a loop in the traced graph (at {dep.target.name}); "
                    "a recurrent computation cannot be permuted exactly"
                )
            if fresh:
                reached.setdefault((dep.target, dep.handler), set()).update(fresh)
                stack.append((dep.target, dep.handler, [_HybridIndex(i, r) for i, r in sorted(fresh)]))
    return reached


def _role_and_slots(module: nn.Module, name: str, handler_name: str) -> list[tuple[str, str, int, str]]:
    """(module, tensor, axis, role) slots a group item touches, or one clear error for layers we cannot permute."""
    out = handler_name == "prune_out_channels"
    if isinstance(module, CONV):
        if _depthwise(module):  # depthwise: input channel c is output channel c
            return [(name, "weight", 0, "out"), (name, "bias", 0, "out")] + _per_output(module, name)
        # plain and grouped convs alike (a grouped one's weight is handled in its dense block-diagonal form)
        return [(name, "weight", 0, "out"), (name, "bias", 0, "out")] + _per_output(module, name) if out else [(name, "weight", 1, "in")]
    if isinstance(module, CONV_T):
        if module.groups != 1:
            raise OtfuseError(f"module {name} is a grouped transposed conv; it cannot be permuted exactly")
        return [(name, "weight", 1, "out"), (name, "bias", 0, "out")] if out else [(name, "weight", 0, "in")]
    if isinstance(module, nn.Linear):
        return [(name, "weight", 0, "out"), (name, "bias", 0, "out")] + _per_output(module, name) if out else [(name, "weight", 1, "in")]
    if isinstance(module, BATCHNORM + INSTANCENORM):
        return [(name, t, 0, "out") for t in NORM_TENSORS if getattr(module, t, None) is not None]
    if isinstance(module, nn.GroupNorm):  # with several norm groups, channels move within them (_link_blocks)
        return [(name, "weight", 0, "out"), (name, "bias", 0, "out")]
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return [(name, "weight", 0, "out"), (name, "bias", 0, "out")]
    if isinstance(module, nn.PReLU):
        return [(name, "weight", 0, "out")] if module.num_parameters > 1 else []
    if any(True for _ in module.parameters(recurse=False)) or any(b is not None for b in module.buffers(recurse=False)):
        raise OtfuseError(f"module {name} ({type(module).__name__}) holds tensors in a channel group and otfuse cannot permute it exactly")
    return []  # parameter-free: activations, additions, concatenations, flattens


def _per_output(module: nn.Module, name: str) -> list[tuple[str, str, int, str]]:
    """Slots of a conv or linear subclass's own extra per-output-channel tensors (an NFNet conv's `gain`, shape
    (out, 1, 1, 1)): they move with the outputs."""
    n = module.weight.shape[0]
    extra = [
        (k, t)
        for k, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if k not in ("weight", "bias") and t is not None and t.ndim >= 1 and t.shape[0] == n and t[0].numel() == 1
    ]
    return [(name, k, 0, "out") for k, _ in extra]


def _kind(module: nn.Module) -> str:
    if isinstance(module, CONV + CONV_T + (nn.Linear,)):
        return "layer"
    return "norm" if isinstance(module, BATCHNORM + INSTANCENORM + (nn.GroupNorm, nn.LayerNorm)) else "other"


def _to_groups(
    reached: dict,
    names: dict,
    order: dict[str, int],
    params: dict[int, str],
    unwrapped: dict[int, int],
    attention: dict[str, Attention],
    sites: list[EinsumSite],
) -> list[ChannelGroup]:
    """The channel groups of one producer's reach: its channels coupled into group channels (every root index
    that reaches one index of one tensor belongs to one group channel), then split into parts by where they go
    (a split's parts, a partial residual's two sides): each part is a group whose channels move among themselves."""
    slots: dict[tuple[str, str, int, str], set[tuple[int, int]]] = {}
    kinds: dict[str, str] = {}
    last: set[str] = set()  # modules that see channels on the last axis
    dense: dict[str, int] = {}
    norm_groups: dict[str, set[tuple[int, int]]] = {}  # GroupNorms: their channels move within norm groups
    root = None
    for (node, handler), pairs in reached.items():
        module = node.module
        if isinstance(module, nn.Parameter):
            found, name = _parameter_slots(module, params, unwrapped)
            found = [(sl, 1) for sl in found]
        else:
            name = names.get(module, None)
            if name is None:
                continue  # Torch-Pruning's own placeholder ops (additions, splits, concatenations)
        if name in attention:  # traced as one layer: its q/k/v projection reads the channels, its output projection writes them
            spec = attention[name]
            out = getattr(handler, "__name__", "") == "prune_out_channels"
            found = [((n, t, a, "out" if out else "in"), 1) for n, t, a in (spec.outputs if out else spec.inputs)]
            kinds.update({n: "layer" if n in spec.layers else "other" for (n, *_), _ in found})
            # a Linear reads and writes channels last; a conv inside (a spatial reduction of the keys' input) reads dim 1
            convs = {n for m, n in names.items() if isinstance(m, CONV) and n.startswith(f"{name}.")}
            last.update(n for (n, *_), _ in found if n not in convs)
        elif not isinstance(module, nn.Parameter):
            found = [
                sl for sl in _role_and_slots(module, name, getattr(handler, "__name__", "")) if getattr(module, sl[1], None) is not None
            ]
            found = [(sl, 1) for sl in found] + _stored_slots(module, name, found)
            if any(name == site.stand_in for site in sites):  # an einsum's stand-in Linear: its weight is the parameter
                found = [((*translated(sites, sl[:3]), sl[3]), k) for sl, k in found]
                name = ".".join(found[0][0][:2]).lstrip(".")  # the parameter's name: the group's, when it produces
            kinds[name] = _kind(module)
            if _channels_last(module):
                last.add(name)
            if isinstance(module, CONV) and 1 < module.groups and not _depthwise(module):
                dense[name] = module.groups
            if isinstance(module, nn.GroupNorm) and module.num_groups > 1:
                norm_groups.setdefault(name, set()).update(pairs)
        root = root or name
        for slot, k in found:
            slots.setdefault(slot, set()).update(_spread(pairs, k))
    if not slots:
        return []
    channel = _union_roots([pairs for pairs in slots.values()] + list(norm_groups.values()))
    parts: dict[tuple, list[int]] = {}  # a part's signature (positions per tensor) -> its group channels
    positions = {slot: _positions(pairs, channel) for slot, pairs in slots.items()}
    for c in sorted(set(channel.values())):
        parts.setdefault(tuple(len(positions[sl].get(c, ())) for sl in slots), []).append(c)
    out = []
    for signature, chans in parts.items():
        members = [
            Member(
                n,
                t,
                a,
                _index_matrix([positions[(n, t, a, role)][c] for c in chans], n),
                role,
                kinds.get(n, "other"),
                dense.get(n, 1) if t == "weight" else 1,
            )
            for ((n, t, a, role), count) in zip(slots, signature)
            if count
        ]
        name = root if len(parts) == 1 else f"{root}[{min(chans)}]"
        group = _group(name, len(chans), members, last, order)
        group.norm_blocks = {n: [sorted(i for i, r in pairs if channel[r] == c) for c in chans] for n, pairs in norm_groups.items()}
        out.append(group)
    return out


def _union_roots(pair_sets: list[set[tuple[int, int]]]) -> dict[int, int]:
    """Root index -> its group channel (the smallest root index it is coupled with): two root indices that
    reach the same position of one tensor are one channel."""
    parent: dict[int, int] = {}

    def find(r: int) -> int:
        while parent.setdefault(r, r) != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for pairs in pair_sets:
        first: dict[int, int] = {}
        for idx, r in pairs:
            a, b = find(first.setdefault(idx, r)), find(r)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {r: find(r) for r in list(parent)}


def _positions(pairs: set[tuple[int, int]], channel: dict[int, int]) -> dict[int, list[int]]:
    """Group channel -> its positions (sorted) on one tensor's axis."""
    out: dict[int, set[int]] = {}
    for idx, r in pairs:
        out.setdefault(channel[r], set()).add(idx)
    return {c: sorted(v) for c, v in out.items()}


def _group(name: str, size: int, members: list[Member], last: set[str], order: dict[str, int]) -> ChannelGroup:
    axis = lambda m: -1 if m.module in last else 1
    observations = [Observation(m.module, m.index, "input", axis(m)) for m in members if m.role == "in" and m.tensor == "weight"]
    producers = [m for m in members if m.role == "out" and m.tensor == "weight"]
    norms = {m.module for m in producers if m.kind == "norm"}
    # a producer followed by a norm is read at the norm's output; one without a norm at its own
    normed = {m.module for m in producers if m.kind == "layer" and any(_follows(n, m.module, order) for n in norms)}
    pre = [
        Observation(m.module, m.index, "output", axis(m))
        for m in producers
        if m.kind == "norm" or (m.kind == "layer" and m.module not in normed)
    ]
    first = min((order.get(m.module, 1 << 30) for m in members if m.role == "out"), default=1 << 30)
    return ChannelGroup(name, size, members, observations, pre, first)


# How an attention layer's channels pair up, tried in this order until the exactness check holds (`relaid`):
# "dot": q with k (softmax(q k^T) v), v with the output; "cross": q with the output, k with v (XCiT's attention over
# channels, softmax(q^T k) applied to v); "rotary": q and k stay in place within a head (a rotary embedding turns
# fixed channel pairs), whole heads still move; "pinned": heads stay in place (a per-head tensor outside the layer,
# shared by several layers), channels move within them; "rotary-pinned": both.
LAYOUTS = ("dot", "cross", "rotary", "pinned", "rotary-pinned")


def _head_groups(spec: Attention, order: dict[str, int], layout: str = "dot") -> list[ChannelGroup]:
    """An attention layer's two inner groups, heads as blocks of one family. In the "dot" layout `<name>:qk` holds
    the q and k channels (one permutation for both) and the per-head tensors, `<name>:v` the v channels and the output
    projection's inputs; the other LAYOUTS pair them as they say."""
    c = torch.arange(spec.width)
    head = c // spec.head_dim
    kind = lambda module: "layer" if module in spec.layers else "other"
    rotary = layout.startswith("rotary")
    # a rotary layout's q/k group has one channel per head: the head's channels, in place
    unit = (lambda i: i.reshape(spec.heads, -1)) if rotary else (lambda i: i)

    def members(parts: list, role: str, fold=lambda i: i) -> list[Member]:
        by_slot: dict[tuple, list[torch.Tensor]] = {}
        for slot, offset in parts:
            by_slot.setdefault(slot, []).append(c + offset)
        return [Member(n, t, a, fold(torch.stack(cols, 1)), role, kind(n)) for (n, t, a), cols in by_slot.items()]

    def seen(points: list, foldable: bool, fold=lambda i: i) -> list[Observation]:
        return [
            Observation(n, fold(torch.stack([c + o for o in offsets], 1)), on, -1, through, foldable and not through[0])
            for n, on, offsets, through in points
        ]

    first = order.get(spec.name, min((order.get(n, 1 << 30) for n in spec.layers), default=1 << 30))
    per_head = lambda index: [Member(n, t, a, index, "out", "other") for n, t, a in spec.per_head]
    mixed = [Member(n, t, a, c[:, None], "in", kind(n)) for n, t, a in spec.mixed]
    seen_v = seen(spec.seen_v, True)
    if layout == "cross":
        q_seen, k_seen = _split_qk(spec.seen_qk)
        a = ChannelGroup(f"{spec.name}:q", spec.width, members(spec.q, "out") + mixed + per_head(head[:, None]), order=first)
        a.observations, a.pre_observations = [o for o in seen_v if o.on == "input"], seen(q_seen, False)
        b = ChannelGroup(f"{spec.name}:kv", spec.width, members(spec.k + spec.v, "out"), order=first)
        b.pre_observations = seen(k_seen, False) + [o for o in seen_v if o.on == "output"]
    else:
        heads = torch.arange(spec.heads) if rotary else head
        a = ChannelGroup(
            f"{spec.name}:qk",
            spec.heads if rotary else spec.width,
            members(spec.q + spec.k, "out", unit) + per_head(heads[:, None]),
            pre_observations=seen(spec.seen_qk, False, unit),
            order=first,
        )
        b = ChannelGroup(
            f"{spec.name}:v",
            spec.width,
            members(spec.v, "out") + mixed,
            observations=[o for o in seen_v if o.on == "input"],
            pre_observations=[o for o in seen_v if o.on == "output"],
            order=first,
        )
        a.blocks = heads.clone()
    if layout == "cross":
        a.blocks = head.clone()
    b.blocks = head.clone()
    for g in (a, b):
        g.family, g.pinned, g.attention, g.layout = f"{spec.name}:heads", layout.endswith("pinned"), spec, layout
    return [a, b] + [_inner_group(spec, k, first) for k in range(len(spec.inner))]


def _inner_group(spec: Attention, k: int, order: int) -> ChannelGroup:
    """The k-th group of channels inside an attention layer that belong to no head (a reduction of the keys' input)."""
    size, slots, (module, on, axis) = spec.inner[k]
    c = torch.arange(size)[:, None]
    members = [Member(n, t, a, c, role, kind) for (n, t, a), role, kind in slots]
    g = ChannelGroup(f"{spec.name}:inner{k}", size, members, [Observation(module, c, on, axis)], order=order)
    g.attention = spec
    return g


def _split_qk(points: list) -> tuple[list, list]:
    """Where q and where k can be read, apart: a point with two offsets holds both (q first), single points alternate."""
    if all(len(offsets) == 2 for _, _, offsets, _ in points):
        return [(n, on, offsets[:1], t) for n, on, offsets, t in points], [(n, on, offsets[1:], t) for n, on, offsets, t in points]
    return points[0::2], points[1::2]


def relaid(groups: list[ChannelGroup], layouts: dict[str, str]) -> list[ChannelGroup]:
    """`groups` with each named attention layer's inner groups rebuilt in the given layout (one of LAYOUTS); the new
    groups keep the old ones' place in the forward order and their family (blocks linked beyond the layer)."""
    if not layouts:
        return groups
    out: list[ChannelGroup] = []
    done: set[str] = set()
    for g in groups:
        spec = g.attention
        if spec is None or spec.name not in layouts:
            out.append(g)
            continue
        if spec.name in done:
            continue
        done.add(spec.name)
        new = _head_groups(spec, {spec.name: g.order}, layouts[spec.name])  # the inner groups (layout "") come back as they were
        for h in (h for h in new if h.blocks is not None):
            h.family, h.pinned = g.family, h.pinned or g.pinned
        out += new
    if any(layout.endswith("pinned") for layout in layouts.values()):  # a pinned family's every group keeps its blocks
        pinned = {g.family for g in out if g.pinned}
        for g in out:
            g.pinned = g.pinned or (g.family in pinned and g.blocks is not None)
    return sorted(out, key=lambda g: (g.order, g.name))  # find_groups' order: two models' lists pair up by position


def _stored_slots(module: nn.Module, name: str, slots: list) -> list[tuple[tuple, int]]:
    """(slot, spread) for each tensor a model stores behind a parametrised one in `slots`: `torch.nn.utils.parametrize`'s
    originals (and its parametrisations' own per-channel buffers, such as spectral norm's u and v). Carrying
    rewrites these; the parametrised tensor is computed from them.
    `spread` > 1: a vector over the weight's flattened columns, channel i at positions i * spread ... A stored
    tensor whose axis cannot follow is one error naming it."""
    out = []
    for _, tensor, axis, role in slots:
        logical = getattr(module, tensor)
        stored = []
        if parametrize.is_parametrized(module, tensor):
            prefix = f"{name}.parametrizations.{tensor}"
            stored = [(f"{prefix}.{n}".rpartition("."), t) for n, t in module.parametrizations[tensor].named_parameters()]
            stored += [(f"{prefix}.{n}".rpartition("."), t) for n, t in module.parametrizations[tensor].named_buffers()]
        size = logical.shape[axis]
        columns = logical[0].numel() if logical.ndim > 1 else -1
        for (owner, _, attr), t in stored:
            if t.ndim == logical.ndim and t.shape[axis] == size:
                out.append(((owner, attr, axis, role), 1))
            elif t.ndim == logical.ndim and t.shape[axis] == 1:
                continue  # broadcast along this axis (weight_norm's g on the input axis): nothing to permute
            elif t.ndim == 1 and axis == 0 and t.numel() == size:
                out.append(((owner, attr, 0, role), 1))
            elif t.ndim == 1 and axis == 1 and t.numel() == columns:
                out.append(((owner, attr, 0, role), columns // size))
            elif t.ndim == 1 and t.numel() == (columns if axis == 0 else size if logical.ndim > 1 else -2):
                continue  # the vector runs along the other axis
            else:
                raise OtfuseError(
                    f"module {name}: its {tensor} is computed from {owner}.{attr} of shape {tuple(t.shape)}, "
                    f"which otfuse cannot permute along the {tensor}'s axis {axis}; remove the parametrisation "
                    "(torch.nn.utils.parametrize.remove_parametrizations) before fusing"
                )
    return out


def _spread(pairs: set[tuple[int, int]], k: int) -> set[tuple[int, int]]:
    """(position, root) pairs of a vector over flattened columns: input channel i at i * k ... i * k + k - 1."""
    return pairs if k == 1 else {(i * k + j, r) for i, r in pairs for j in range(k)}


def _parameter_slots(p: nn.Parameter, params: dict[int, str], unwrapped: dict[int, int]) -> tuple[list, str]:
    """A bare parameter coupled to channels (ConvNeXt's layer scale): permuted on the axis DepGraph prunes."""
    name = params.get(id(p))
    if name is None or id(p) not in unwrapped:
        raise OtfuseError(
            f"a parameter of shape {tuple(p.shape)} outside the model's named parameters is coupled to channels; register it on a module"
        )
    owner, _, attr = name.rpartition(".")
    return [(owner, attr, unwrapped[id(p)], "out")], name


def _channels_last(module: nn.Module) -> bool:
    """Whether the module reads (Linear) or writes (LayerNorm as such, not a subclass that permutes) channels last."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _link_blocks(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Give the groups a grouped conv reads and writes, and those a GroupNorm normalises, their block structure,
    and link them into one family: a permutation may move channels only within their block (a conv group, a
    norm group), and must move the blocks of every linked side alike."""
    where = {(m.module, m.axis): g for g in groups for m in g.members if m.conv_groups > 1 and m.tensor == "weight"}
    normed = {n: g for g in groups for n in g.norm_blocks}
    parent = {g.name: g.name for g in groups}

    def find(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    first_of: dict[str, str] = {}
    for g in groups:  # families given when found (an attention layer's heads)
        if g.family:
            parent[find(g.name)] = find(first_of.setdefault(g.family, g.name))
    for name, mod in model.named_modules():
        if isinstance(mod, CONV) and mod.groups > 1 and not _depthwise(mod):
            sides = [(where.get((name, 1)), mod.in_channels, mod.groups, 1), (where.get((name, 0)), mod.out_channels, mod.groups, 0)]
        elif isinstance(mod, nn.GroupNorm) and mod.num_groups > 1:
            sides = [(normed.get(name), mod.num_channels, mod.num_groups, None)]
        else:
            continue
        pinned = False
        for i, (g, channels, n_blocks, axis) in enumerate(sides):
            if g is None:
                continue
            if axis is None:
                first = torch.tensor([p[0] for p in g.norm_blocks[name]])
            else:
                index = next(m for m in g.members if m.module == name and m.tensor == "weight" and m.axis == axis).index
                if axis == 0 and _spans_blocks(index, channels // n_blocks, n_blocks):
                    # each channel has one output in every block (ResNeSt's radix paths, summed later): the outputs take
                    # any permutation, but a block of inputs cannot move to another block's outputs, so the inputs' blocks stay
                    sides[i], pinned = (None, channels, n_blocks, axis), True
                    continue
                first = index[:, 0]
            blocks = first // (channels // n_blocks)
            if g.blocks is not None and not torch.equal(g.blocks, blocks):
                raise OtfuseError(
                    f"module {name}: its channels are split into blocks that another grouped layer splits "
                    f"differently (groups={n_blocks}); they cannot be permuted exactly"
                )
            g.blocks = blocks
        linked = [g for g, *_ in sides if g is not None]
        for g in linked:
            g.pinned = g.pinned or pinned
        for g in linked[1:]:
            parent[find(g.name)] = find(linked[0].name)
    pinned = {find(g.name) for g in groups if g.pinned}
    for g in groups:
        if g.blocks is not None:
            g.family = find(g.name)
            g.pinned = g.family in pinned


def _spans_blocks(index: torch.Tensor, size: int, n_blocks: int) -> bool:
    """Whether every channel has exactly one position in each of the n_blocks blocks of `size` channels."""
    return index.shape[1] == n_blocks > 1 and bool((torch.sort(index // size, 1).values == torch.arange(n_blocks)).all())


def _follows(norm: str, layer: str, order: dict[str, int]) -> bool:
    """Whether `norm` is called right after `layer` in the forward pass (it normalises that layer's output)."""
    return order.get(norm, -2) == order.get(layer, -10) + 1


def _index_matrix(per: list[list[int]], name: str) -> torch.Tensor:
    """(channels, m): each group channel's positions on one tensor's axis; every channel must have as many."""
    if len({len(p) for p in per}) != 1 or not per[0]:
        raise OtfuseError(f"module {name}: channels map to uneven index sets; this layout cannot be permuted exactly")
    return torch.tensor(per, dtype=torch.long)


def check_same_groups(a: list[ChannelGroup], b: list[ChannelGroup], sizes: bool = True) -> None:
    """Raise one clear error naming the first difference between two models' groups; with
    `sizes=False` the groups may differ in their numbers of channels (models of other widths)."""
    if len(a) != len(b):
        raise OtfuseError(f"the models have {len(a)} and {len(b)} channel groups; fuse models of one architecture")
    for ga, gb in zip(a, b):
        sa, sb = ga.signature(), gb.signature()
        if not sizes:
            sa, sb = _layout(ga), _layout(gb)
        if sa != sb:
            what = f"group {ga.name} has {ga.size} channels" if ga.name == gb.name else f"group {ga.name}"
            other = f"{gb.size}" if ga.name == gb.name else f"group {gb.name}"
            fix = "width and class count" if sizes else "depth and class count"
            raise OtfuseError(f"the models differ: {what} in the first but {other} in the other; fuse models of one architecture, {fix}")


def _layout(g: ChannelGroup) -> tuple:
    """A group's structure without its number of channels: which tensors and axes it touches."""
    return (g.name, tuple((m.module, m.tensor, m.axis, m.index.shape[1]) for m in g.members))


def example_input(images: torch.Tensor, norm: tuple, model: nn.Module) -> torch.Tensor:
    """One normalised image on the model's device: what tracing a model needs."""
    return normalize(images[:1], norm).to(next(model.parameters()).device)
