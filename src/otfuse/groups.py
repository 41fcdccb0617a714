"""Channel groups found by Torch-Pruning's DepGraph, and exact permutation of them.

    groups = channel_groups(model, example_input)      # forward order, classifier outputs excluded
    per_model = groups_of([model_a, model_b], images, norm)   # checked to have the same structure

A group is a set of channels that must move together: a conv's outputs, the BatchNorm after
it, the next convs' inputs, every tensor tied by a residual addition, the slices a torch.cat
splices into its consumers. Each member names a tensor, an axis and, per group channel, the
indices of that axis that belong to it (several for a Linear after a flatten, a slice of a
concatenation).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch_pruning as tp
from torch import nn

from otfuse.data import normalize
from otfuse.errors import OtfuseError
from otfuse.hooks import tapping

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
INSTANCENORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


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

    def signature(self) -> tuple:
        return (self.name, self.size, tuple((m.module, m.tensor, m.axis, tuple(m.index.shape)) for m in self.members))


# --- finding groups --------------------------------------------------------------------------


def channel_groups(model: nn.Module, example_input: torch.Tensor, time_limit: float = 300.0) -> list[ChannelGroup]:
    """Every permutable channel group of `model`, in forward order; the logits are never grouped.

    The model is traced in eval mode (a trace must not move BatchNorm statistics) on `example_input`,
    moved to the model's device. Anything otfuse cannot permute exactly is one OtfuseError naming it,
    and so is a grouping that takes longer than `time_limit` seconds (0: no limit; the limit needs
    the main thread)."""
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
    example_input = example_input.to(params[0].device)
    # one forward pass serves both: Torch-Pruning's trace, and our forward order
    taps = [(n, "output", seen(n, m)) for n, m in model.named_modules() if n]
    try:
        model.eval()
        with tapping(model, taps), torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
    except OtfuseError:
        raise
    except Exception as exc:  # a forward pass that fails, or a trace Torch-Pruning cannot follow
        raise OtfuseError(_trace_failure(model, example_input, exc)) from None
    finally:
        model.train(was_training)
    if not layers:
        raise OtfuseError("the model has no conv or linear layer; nothing to align")
    ignored = [layers[-1]]  # the last layer run produces the logits
    names = {m: n for n, m in model.named_modules()}
    try:
        with _time_limited(time_limit):
            tp_groups = list(_tp_groups(graph, order, names, ignored))
    except _OutOfTime:
        raise OtfuseError(f"Torch-Pruning's DepGraph did not finish grouping {type(model).__name__}'s channels in {time_limit:.0f} s "
                          f"(on an input of shape {tuple(example_input.shape)}, its index mappings through reshapes and "
                          "window partitions grow with the feature maps); give a smaller example input or a larger time_limit") from None
    except Exception as exc:  # Torch-Pruning's own failure on a layout it cannot index (e.g. a channel shuffle)
        raise OtfuseError(_trace_failure(model, example_input, exc)) from None
    params_by_id = {id(p): n for n, p in model.named_parameters()}
    unwrapped = {id(p): dim for p, dim in getattr(graph, "unwrapped_parameters", [])}
    try:
        groups = [_to_group(g, names, order, params_by_id, unwrapped) for g in tp_groups]
    except OtfuseError as exc:
        note = _shuffle_note(model, example_input)
        raise OtfuseError(note or str(exc)) from None
    groups.sort(key=lambda g: g.order)
    _link_grouped_convs(model, groups)
    return groups


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
    return _shuffle_note(model, x) or (f"Torch-Pruning's DepGraph cannot trace {type(model).__name__}: {type(exc).__name__}: "
                                        f"{first}; otfuse cannot find its channel groups")


def _shuffle_note(model: nn.Module, x: torch.Tensor) -> str:
    """The refusal for a channel shuffle (a view of the channels as (groups, channels / groups), transposed),
    or "" when the model has none."""
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
        if type(f).__name__ == "TransposeBackward0" and {f._saved_dim0, f._saved_dim1} == {1, 2} and _is_shuffle(f, consumer):
            return (f"{type(model).__name__} shuffles channels (view as groups, transpose(1, 2), view back): the shuffle "
                    "interleaves the channels of two branches, so no permutation of one branch keeps the function; "
                    "otfuse refuses it rather than fuse it wrongly")
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


def _tp_groups(graph: tp.DependencyGraph, order: dict[str, int], names: dict, ignored: list[nn.Module]):
    """Torch-Pruning's get_all_groups, but rooted at layers in forward order: a producer is always
    the root of its channels, so a depthwise conv after a torch.cat never merges the two producers'
    channels into one group (a permutation across them could not be applied)."""
    roots = sorted((m for m in graph.module2node if isinstance(m, CONV + CONV_T + (nn.Linear,))),
                   key=lambda m: order.get(names.get(m), 1 << 30))
    visited: set = set()
    for m in roots:
        if m in ignored or m in visited:
            continue
        pruner = graph.get_pruner_of_module(m)
        channels = pruner.get_out_channels(m) if pruner else None
        if channels is None:
            continue
        group = graph.get_pruning_group(m, pruner.prune_out_channels, list(range(channels)))
        touches_ignored = False
        for item in group.items:
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(item.dep.target.module)
                touches_ignored |= item.dep.target.module in ignored
        if not touches_ignored:
            yield group


def _role_and_slots(module: nn.Module, name: str, handler_name: str) -> list[tuple[str, str, int, str]]:
    """(module, tensor, axis, role) slots a group item touches, or one clear error for layers we cannot permute."""
    out = handler_name == "prune_out_channels"
    if isinstance(module, CONV):
        if _depthwise(module):
            return [(name, "weight", 0, "out"), (name, "bias", 0, "out")]  # depthwise: input channel c is output channel c
        # plain and grouped convs alike (a grouped one's weight is handled in its dense block-diagonal form)
        return [(name, "weight", 0, "out"), (name, "bias", 0, "out")] if out else [(name, "weight", 1, "in")]
    if isinstance(module, CONV_T):
        if module.groups != 1:
            raise OtfuseError(f"module {name} is a grouped transposed conv; it cannot be permuted exactly")
        return [(name, "weight", 1, "out"), (name, "bias", 0, "out")] if out else [(name, "weight", 0, "in")]
    if isinstance(module, nn.Linear):
        return [(name, "weight", 0, "out"), (name, "bias", 0, "out")] if out else [(name, "weight", 1, "in")]
    if isinstance(module, BATCHNORM + INSTANCENORM):
        return [(name, t, 0, "out") for t in NORM_TENSORS if getattr(module, t, None) is not None]
    if isinstance(module, nn.GroupNorm):
        if module.num_groups != 1:
            raise OtfuseError(f"module {name} is a GroupNorm with {module.num_groups} groups; only 1 group can be permuted exactly")
        return [(name, "weight", 0, "out"), (name, "bias", 0, "out")]
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return [(name, "weight", 0, "out"), (name, "bias", 0, "out")]
    if isinstance(module, nn.PReLU):
        return [(name, "weight", 0, "out")] if module.num_parameters > 1 else []
    if any(True for _ in module.parameters(recurse=False)) or any(b is not None for b in module.buffers(recurse=False)):
        raise OtfuseError(f"module {name} ({type(module).__name__}) holds tensors in a channel group and otfuse cannot permute it exactly")
    return []  # parameter-free: activations, additions, concatenations, flattens


def _kind(module: nn.Module) -> str:
    if isinstance(module, CONV + CONV_T + (nn.Linear,)):
        return "layer"
    return "norm" if isinstance(module, BATCHNORM + INSTANCENORM + (nn.GroupNorm, nn.LayerNorm)) else "other"


def _to_group(tp_group, names: dict, order: dict[str, int], params: dict[int, str], unwrapped: dict[int, int]) -> ChannelGroup:
    pairs: dict[tuple[str, str, int, str], set[tuple[int, int]]] = {}
    kinds: dict[str, str] = {}
    last: set[str] = set()  # modules that see channels on the last axis
    dense: dict[str, int] = {}
    root = None
    for item in tp_group.items:
        module = item.dep.target.module
        if isinstance(module, nn.Parameter):
            slots, name = _parameter_slots(module, params, unwrapped)
        else:
            name = names.get(module, None)
            if name is None:
                continue  # Torch-Pruning's own placeholder ops
            slots = _role_and_slots(module, name, getattr(item.dep.handler, "__name__", ""))
            kinds[name] = _kind(module)
            if _channels_last(module):
                last.add(name)
            if isinstance(module, CONV) and 1 < module.groups and not _depthwise(module):
                dense[name] = module.groups
        root = root or name
        for owner, tensor, axis, role in slots:
            if isinstance(module, nn.Module) and getattr(module, tensor, None) is None:
                continue  # no bias, no affine parameters
            pairs.setdefault((owner, tensor, axis, role), set()).update(zip(item.idxs, item.root_idxs))
    size = max(r for s in pairs.values() for _, r in s) + 1
    members = [Member(n, t, a, _index_matrix(s, size, n), role, kinds.get(n, "other"), dense.get(n, 1) if t == "weight" else 1)
               for (n, t, a, role), s in pairs.items()]
    axis = lambda m: -1 if m.module in last else 1
    observations = [Observation(m.module, m.index, "input", axis(m)) for m in members if m.role == "in" and m.tensor == "weight"]
    producers = [m for m in members if m.role == "out" and m.tensor == "weight"]
    norms = {m.module for m in producers if m.kind == "norm"}
    # a producer followed by a norm is read at the norm's output; one without a norm at its own
    normed = {m.module for m in producers if m.kind == "layer" and any(_follows(n, m.module, order) for n in norms)}
    pre = [Observation(m.module, m.index, "output", axis(m)) for m in producers
           if m.kind == "norm" or (m.kind == "layer" and m.module not in normed)]
    first = min((order.get(m.module, 1 << 30) for m in members if m.role == "out"), default=1 << 30)
    return ChannelGroup(root, size, members, observations, pre, first)


def _parameter_slots(p: nn.Parameter, params: dict[int, str], unwrapped: dict[int, int]) -> tuple[list, str]:
    """A bare parameter coupled to channels (ConvNeXt's layer scale): permuted on the axis DepGraph prunes."""
    name = params.get(id(p))
    if name is None or id(p) not in unwrapped:
        raise OtfuseError(f"a parameter of shape {tuple(p.shape)} outside the model's named parameters is coupled to channels; "
                          "register it on a module")
    owner, _, attr = name.rpartition(".")
    return [(owner, attr, unwrapped[id(p)], "out")], name


def _channels_last(module: nn.Module) -> bool:
    """Whether the module reads (Linear) or writes (LayerNorm as such, not a subclass that permutes) channels last."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward


def _depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _link_grouped_convs(model: nn.Module, groups: list[ChannelGroup]) -> None:
    """Give the groups a grouped conv reads and writes their block structure, and link them into one family:
    a permutation may move channels only within their block, and must move the blocks of both sides alike."""
    where = {(m.module, m.axis): g for g in groups for m in g.members if m.conv_groups > 1 and m.tensor == "weight"}
    parent = {g.name: g.name for g in groups}

    def find(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for name, conv in model.named_modules():
        if not (isinstance(conv, CONV) and conv.groups > 1 and not _depthwise(conv)):
            continue
        sides = [(where.get((name, 1)), conv.in_channels), (where.get((name, 0)), conv.out_channels)]
        for g, channels in sides:
            if g is None:
                continue
            m = next(m for m in g.members if m.module == name and m.tensor == "weight")
            blocks = m.index[:, 0] // (channels // conv.groups)
            if g.blocks is not None and not torch.equal(g.blocks, blocks):
                raise OtfuseError(f"module {name}: its channels are split into blocks that another grouped conv splits "
                                  f"differently (groups={conv.groups}); they cannot be permuted exactly")
            g.blocks = blocks
        linked = [g for g, _ in sides if g is not None]
        for g in linked[1:]:
            parent[find(g.name)] = find(linked[0].name)
    for g in groups:
        if g.blocks is not None:
            g.family = find(g.name)


def _follows(norm: str, layer: str, order: dict[str, int]) -> bool:
    """Whether `norm` is called right after `layer` in the forward pass (it normalises that layer's output)."""
    return order.get(norm, -2) == order.get(layer, -10) + 1


def _index_matrix(pairs: set[tuple[int, int]], size: int, name: str) -> torch.Tensor:
    per: list[list[int]] = [[] for _ in range(size)]
    for idx, r in pairs:
        per[r].append(idx)
    counts = {len(p) for p in per}
    if len(counts) != 1 or 0 in counts:
        raise OtfuseError(f"module {name}: channels map to uneven index sets; this layout cannot be permuted exactly")
    return torch.tensor([sorted(p) for p in per], dtype=torch.long)


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


def groups_of(models: list[nn.Module], images: torch.Tensor, norm: tuple, same_width: bool = True) -> list[list[ChannelGroup]]:
    """Every model's channel groups, after checking they all have the first one's structure
    (and its numbers of channels, unless `same_width` is False)."""
    per_model = [channel_groups(m, example_input(images, norm, m)) for m in models]
    for g in per_model[1:]:
        check_same_groups(per_model[0], g, sizes=same_width)
    return per_model
