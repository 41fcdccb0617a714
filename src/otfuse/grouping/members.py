"""From the channels a producer reaches in the traced graph to channel groups: which tensor axes move, and where
the channels can be seen.

    groups = to_groups(reached, names, order, params, unwrapped, attention, sites)

A conv or linear layer's output axis, the BatchNorm after it, the next layers' input axes, per-channel extras, the
tensors a parametrisation stores behind a weight, bare parameters coupled to channels; a layer otfuse cannot permute
exactly is one OtfuseError naming it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from otfuse.errors import OtfuseError
from otfuse.grouping.attention import Attention
from otfuse.grouping.einsum import EinsumSite, translated
from otfuse.grouping.group import BATCHNORM, CONV, CONV_T, INSTANCENORM, NORM_TENSORS, ChannelGroup, Member, Observation, depthwise


def to_groups(
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
            if isinstance(module, CONV) and 1 < module.groups and not depthwise(module):
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


def _role_and_slots(module: nn.Module, name: str, handler_name: str) -> list[tuple[str, str, int, str]]:
    """(module, tensor, axis, role) slots a group item touches, or one clear error for layers we cannot permute."""
    out = handler_name == "prune_out_channels"
    if isinstance(module, CONV):
        if depthwise(module):  # depthwise: input channel c is output channel c
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
    if isinstance(module, nn.GroupNorm):  # with several norm groups, channels move within them (otfuse.grouping.blocks)
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


def _index_matrix(per: list[list[int]], name: str) -> torch.Tensor:
    """(channels, m): each group channel's positions on one tensor's axis; every channel must have as many."""
    if len({len(p) for p in per}) != 1 or not per[0]:
        raise OtfuseError(f"module {name}: channels map to uneven index sets; this layout cannot be permuted exactly")
    return torch.tensor(per, dtype=torch.long)


def _follows(norm: str, layer: str, order: dict[str, int]) -> bool:
    """Whether `norm` is called right after `layer` in the forward pass (it normalises that layer's output)."""
    return order.get(norm, -2) == order.get(layer, -10) + 1
