"""Channel groups found by Torch-Pruning's DepGraph, and exact permutation of them.

    groups = channel_groups(model, example_input)      # forward order, classifier outputs excluded
    perms = {g.name: torch.randperm(g.size) for g in groups}
    permuted = permute(model, groups, perms)            # a copy computing the same function

A group is a set of channels that must move together: a conv's outputs, the BatchNorm after
it, the next convs' inputs, every tensor tied by a residual addition, the slices a torch.cat
splices into its consumers. Each member names a tensor, an axis and, per group channel, the
indices of that axis that belong to it (several for a Linear after a flatten, a slice of a
concatenation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from otfuse.errors import OtfuseError

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
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


@dataclass
class Observation:
    """Where a group's channels can be seen: the input (after the nonlinearity) or the output
    (before it) of `module`, at `index` of dim 1."""

    module: str
    index: torch.Tensor  # (size, m) long
    on: str = "input"  # "input": read by a consumer; "output": written by a producer


@dataclass
class ChannelGroup:
    name: str
    size: int
    members: list[Member]
    observations: list[Observation] = field(default_factory=list)  # consumer inputs: after the nonlinearity
    pre_observations: list[Observation] = field(default_factory=list)  # norm (else layer) outputs: before it
    order: int = 0  # position of the first producer in the forward pass

    def signature(self) -> tuple:
        return (self.name, self.size, tuple((m.module, m.tensor, m.axis, tuple(m.index.shape)) for m in self.members))


# --- finding groups --------------------------------------------------------------------------


def channel_groups(model: nn.Module, example_input: torch.Tensor, ignored: list[nn.Module] | None = None) -> list[ChannelGroup]:
    """Every permutable channel group of `model`, in forward order; the logits are never grouped."""
    was_training = model.training
    order: dict[str, int] = {}
    layers: list[nn.Module] = []

    def hook(mod, _inp, _out, name):
        order.setdefault(name, len(order))
        if isinstance(mod, CONV + CONV_T + (nn.Linear,)):
            layers.append(mod)

    # one forward pass serves both: Torch-Pruning's trace, and our forward order
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in model.named_modules() if n]
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_input, verbose=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not layers:
        raise OtfuseError("the model has no conv or linear layer; nothing to align")
    ignored = list(ignored) if ignored else [layers[-1]]  # the last layer run produces the logits
    names = {m: n for n, m in model.named_modules()}
    groups = [_to_group(g, names, order) for g in _tp_groups(graph, order, names, ignored)]
    groups.sort(key=lambda g: g.order)
    return groups


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


def _role_and_slots(module: nn.Module, name: str, handler_name: str) -> list[tuple[str, int, str]]:
    """(tensor, axis, role) slots a group item touches, or one clear error for layers we cannot permute."""
    out = handler_name == "prune_out_channels"
    if isinstance(module, CONV):
        if module.groups == 1:
            return [("weight", 0, "out"), ("bias", 0, "out")] if out else [("weight", 1, "in")]
        if module.groups == module.in_channels == module.out_channels:
            return [("weight", 0, "out"), ("bias", 0, "out")]  # depthwise: input channel c is output channel c
        raise OtfuseError(f"module {name} is a grouped conv (groups={module.groups}) that is not depthwise; it cannot be permuted exactly")
    if isinstance(module, CONV_T):
        if module.groups != 1:
            raise OtfuseError(f"module {name} is a grouped transposed conv; it cannot be permuted exactly")
        return [("weight", 1, "out"), ("bias", 0, "out")] if out else [("weight", 0, "in")]
    if isinstance(module, nn.Linear):
        return [("weight", 0, "out"), ("bias", 0, "out")] if out else [("weight", 1, "in")]
    if isinstance(module, BATCHNORM):
        return [(t, 0, "out") for t in NORM_TENSORS]
    if isinstance(module, nn.GroupNorm):
        if module.num_groups != 1:
            raise OtfuseError(f"module {name} is a GroupNorm with {module.num_groups} groups; only 1 group can be permuted exactly")
        return [("weight", 0, "out"), ("bias", 0, "out")]
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return [("weight", 0, "out"), ("bias", 0, "out")]
    if isinstance(module, nn.PReLU):
        return [("weight", 0, "out")] if module.num_parameters > 1 else []
    if isinstance(module, nn.Parameter):
        raise OtfuseError(f"a bare parameter of shape {tuple(module.shape)} is coupled to channels; wrap it in a module otfuse knows")
    if any(True for _ in module.parameters(recurse=False)) or any(b is not None for b in module.buffers(recurse=False)):
        raise OtfuseError(f"module {name} ({type(module).__name__}) holds tensors in a channel group and otfuse cannot permute it exactly")
    return []  # parameter-free: activations, additions, concatenations, flattens


def _kind(module: nn.Module) -> str:
    if isinstance(module, CONV + CONV_T + (nn.Linear,)):
        return "layer"
    return "norm" if isinstance(module, BATCHNORM + (nn.GroupNorm, nn.LayerNorm)) else "other"


def _to_group(tp_group, names: dict, order: dict[str, int]) -> ChannelGroup:
    pairs: dict[tuple[str, str, int, str], set[tuple[int, int]]] = {}
    kinds: dict[str, str] = {}
    root = None
    for item in tp_group.items:
        module = item.dep.target.module
        name = names.get(module, None)
        if isinstance(module, nn.Module) and name is None:
            continue  # Torch-Pruning's own placeholder ops
        root = root or name
        kinds[name] = _kind(module)
        for tensor, axis, role in _role_and_slots(module, name, getattr(item.dep.handler, "__name__", "")):
            if getattr(module, tensor, None) is None:
                continue
            pairs.setdefault((name, tensor, axis, role), set()).update(zip(item.idxs, item.root_idxs))
    size = max(r for s in pairs.values() for _, r in s) + 1
    members = [Member(n, t, a, _index_matrix(s, size, n), role, kinds[n]) for (n, t, a, role), s in pairs.items()]
    observations = [Observation(m.module, m.index) for m in members if m.role == "in" and m.tensor == "weight"]
    producers = [m for m in members if m.role == "out" and m.tensor == "weight"]
    norms = {m.module for m in producers if m.kind == "norm"}
    # a producer followed by a norm is read at the norm's output; one without a norm at its own
    normed = {m.module for m in producers if m.kind == "layer" and any(_follows(n, m.module, order) for n in norms)}
    pre = [Observation(m.module, m.index, "output") for m in producers if m.kind == "norm" or (m.kind == "layer" and m.module not in normed)]
    first = min((order.get(m.module, 1 << 30) for m in members if m.role == "out"), default=1 << 30)
    return ChannelGroup(root, size, members, observations, pre, first)


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


def check_same_groups(a: list[ChannelGroup], b: list[ChannelGroup]) -> None:
    """Raise one clear error naming the first difference between two models' groups."""
    if len(a) != len(b):
        raise OtfuseError(f"the models have {len(a)} and {len(b)} channel groups; fuse models of one architecture")
    for ga, gb in zip(a, b):
        if ga.signature() != gb.signature():
            what = f"group {ga.name} has {ga.size} channels" if ga.name == gb.name else f"group {ga.name}"
            other = f"{gb.size}" if ga.name == gb.name else f"group {gb.name}"
            raise OtfuseError(f"the models differ: {what} in the first but {other} in the other; fuse models of one architecture, width and class count")


# --- applying permutations -------------------------------------------------------------------


def permute(model: nn.Module, groups: list[ChannelGroup], maps: dict[str, torch.Tensor], inplace: bool = False) -> nn.Module:
    """Apply one map per group (a permutation, new channel c = old channel p[c]; or a (C, C)
    row-stochastic matrix, new channel c = sum_j T[c, j] old channel j) to every member."""
    target = model if inplace else copy.deepcopy(model)
    tensors = dict(target.named_parameters())
    tensors.update(dict(target.named_buffers()))
    hard: dict[str, dict[int, torch.Tensor]] = {}  # tensor -> axis -> source index of every position
    with torch.no_grad():
        for g in groups:
            if g.name not in maps:
                continue
            m = maps[g.name]
            for mem in g.members:
                key = f"{mem.module}.{mem.tensor}" if mem.module else mem.tensor
                t = tensors[key]
                if m.is_floating_point():
                    t.copy_(apply_map(t, mem.axis, mem.index.to(t.device), m.to(t.device)))
                    continue
                src = hard.setdefault(key, {}).setdefault(mem.axis, torch.arange(t.shape[mem.axis]))
                src[mem.index.reshape(-1)] = src[mem.index[m].reshape(-1)]
        # permutations: one gather per axis and one copy per tensor, however many groups touch it
        for key, axes in hard.items():
            t = tensors[key]
            out = t
            for axis, src in axes.items():
                out = out.index_select(axis, src.to(t.device))
            t.copy_(out)
    return target


def apply_map(t: torch.Tensor, axis: int, index: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """`t` with the positions `index` on `axis` remapped by the permutation or matrix `m`."""
    flat = index.reshape(-1)
    if m.dtype in (torch.int64, torch.int32):
        src = index[m].reshape(-1)
        return t.index_copy(axis, flat, t.index_select(axis, src))
    size, k = index.shape
    sel = t.index_select(axis, flat).movedim(axis, 0)
    mixed = (m.to(t.dtype) @ sel.reshape(size, -1)).reshape(sel.shape)
    return t.index_copy(axis, flat, mixed.movedim(0, axis))


def random_perms(groups: list[ChannelGroup], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.randperm(g.size, generator=gen) for g in groups}
