"""Attention layers, recognised by their structure: where their heads' q, k and v channels live.

    layers = attention_layers(model)          # {module name: Attention}, every attention layer found
    pruners = leaf_pruners(model, layers)     # lets DepGraph treat each one as one layer (input -> output)
    with traced_as_leaves(model, layers):     # ... and hides their insides from its trace
        graph = tp.DependencyGraph().build_dependency(model, x, customized_pruners=pruners)

Inside an attention layer the channels move in a way DepGraph cannot follow (a linear map reshaped into
heads, q multiplied with k): otfuse traces each such layer as one leaf whose input channels are read by
its q/k/v projection and whose output channels are written by its output projection, and describes its
inside here. Within a head, q and k channels take one permutation (q·k is kept), v channels and the
output projection's inputs another; whole heads move as blocks, and the per-head tensors (a relative
position bias table, a logit scale, the last layer of a continuous position bias MLP) with them.

Recognised (add a kind with `@recognise`):
- `nn.MultiheadAttention` as self-attention (queries, keys and values one tensor), `bias_k`/`bias_v`;
- "qkv" attention, the layout of timm's Attention, Swin's window attention (timm and torchvision) and
  BEiT's: a child Linear `qkv` (q, k, v stacked, each heads x head_dim), a child Linear `proj`, an int
  `num_heads`, optionally `q_bias`/`k_bias`/`v_bias`, `relative_position_bias_table` (entries, heads),
  `logit_scale` (heads, ...), `cpb_mlp` (a Sequential whose last Linear has one output per head);
  torchvision MaxViT's `to_qkv`, `merge` and `n_heads` are the same layout, timm MaxViT's `head_first` packs
  each head's q, k and v together;
- q and k from one Linear `qk`, v from a Linear `v` (ConViT's gated positional self-attention);
- q, k, v from three Linears (CaiT's class attention, CrossViT's).
How q, k and v pair up inside (plain, XCiT's cross-covariance, rotary, heads pinned by a shared table) is found
by the exactness check: `otfuse.grouping.heads.LAYOUTS`.
A layer whose q/k normalisation has weights shared across heads is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from otfuse.errors import OtfuseError

Slot = tuple[str, str, int]  # (module, tensor, axis)
Offset = int | torch.Tensor  # channel c sits at c + offset (a tensor: one offset per channel)


@dataclass
class Attention:
    """One attention layer's channels. Positions are on the slot's axis: channel c of a q/k/v slot with offset o
    is position o + c; a per-head slot holds head c // head_dim at position c // head_dim."""

    name: str
    heads: int
    head_dim: int
    inputs: list[Slot]  # the residual stream's channels read by q/k/v (input axis)
    outputs: list[Slot]  # the residual stream's channels written by the output projection (output axis and bias)
    q: list[tuple[Slot, Offset]] = field(default_factory=list)  # (slot, offset)
    k: list[tuple[Slot, Offset]] = field(default_factory=list)
    v: list[tuple[Slot, Offset]] = field(default_factory=list)
    mixed: list[Slot] = field(default_factory=list)  # the output projection's inputs: v's channels, consumed
    per_head: list[Slot] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)  # child Linears called in the forward pass (hooks see them)
    # channels inside the layer that are no head's: a spatial reduction of the keys' and values' input (conv, norm,
    # the kv Linear's input): (size, [(slot, role, kind)], where they can be read: (module, "input", axis))
    inner: list[tuple[int, list[tuple[Slot, str, str]], tuple[str, str, int]]] = field(default_factory=list)
    # where q/k and v activations can be read: (module, "input"/"output", offsets, through): channel c at offset + c
    # of that tensor, or of `through` (a weight, and its bias or "") applied to it
    seen_qk: list[tuple[str, str, tuple[Offset, ...], tuple[str, str]]] = field(default_factory=list)
    seen_v: list[tuple[str, str, tuple[Offset, ...], tuple[str, str]]] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


RECOGNISERS: list[Callable[[str, nn.Module], Attention | None]] = []


def recognise(fn: Callable[[str, nn.Module], Attention | None]):
    """Register a recogniser: (name, module) -> its Attention, or None when the module is not of its kind."""
    RECOGNISERS.append(fn)
    return fn


def attention_layers(model: nn.Module) -> dict[str, Attention]:
    """Every attention layer of `model` by module name (outermost first; none inside another)."""
    found: dict[str, Attention] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in found):
            continue
        for fn in RECOGNISERS:
            spec = fn(name, module)
            if spec is not None:
                found[name] = spec
                break
    return found


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _around(name: str, heads: int, e: int, inputs: list[Slot], proj: str, has_bias: bool, layers: list[str]) -> Attention:
    """An attention layer of `heads` heads over `e` channels read by `inputs`, written by the Linear `proj`."""
    outputs = [(proj, "weight", 0)] + ([(proj, "bias", 0)] if has_bias else [])
    return Attention(name, heads, e // heads, inputs=inputs, outputs=outputs, mixed=[(proj, "weight", 1)], layers=layers)


@recognise
def multihead_attention(name: str, m: nn.Module) -> Attention | None:
    if not isinstance(m, nn.MultiheadAttention):
        return None
    if m.in_proj_weight is None:
        raise OtfuseError(
            f"module {name}: its keys or values are narrower or wider than its queries (kdim/vdim), so they "
            "come from another tensor; otfuse fuses self-attention only"
        )
    e = m.embed_dim
    spec = _around(name, m.num_heads, e, [(name, "in_proj_weight", 1)], _join(name, "out_proj"), m.out_proj.bias is not None, [])
    for part, k in (("q", 0), ("k", 1), ("v", 2)):
        slots = [((name, "in_proj_weight", 0), k * e)] + ([((name, "in_proj_bias", 0), k * e)] if m.in_proj_bias is not None else [])
        getattr(spec, part).extend(slots)
    through = (_join(name, "in_proj_weight"), _join(name, "in_proj_bias") if m.in_proj_bias is not None else "")
    spec.seen_qk = [(name, "input", (0, e), through)]
    spec.seen_v = [(name, "input", (2 * e,), through)]
    if m.bias_k is not None:
        spec.k.append(((name, "bias_k", 2), 0))
        spec.v.append(((name, "bias_v", 2), 0))
    return spec


# (q/k/v Linear, output Linear, number of heads): timm, Swin, BEiT, the registry's ViT; torchvision's MaxViT
QKV_NAMES = [("qkv", "proj", "num_heads"), ("to_qkv", "merge", "n_heads")]


@recognise
def qkv_attention(name: str, m: nn.Module) -> Attention | None:
    names = next((n for n in QKV_NAMES if all(hasattr(m, a) for a in n)), None)
    if names is None:
        return None
    qkv, proj, heads = (getattr(m, a) for a in names)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return None
    e = qkv.out_features // 3
    if qkv.out_features != 3 * e or proj.in_features != e or e % heads:
        return None
    for norm in ("q_norm", "k_norm"):
        if any(True for _ in getattr(m, norm, nn.Identity()).parameters()):
            raise OtfuseError(
                f"module {name}: its {norm} has weights shared by every head, so the channels within a head "
                "cannot move alone; otfuse cannot fuse attention with q/k normalisation"
            )
    q, pn = _join(name, names[0]), _join(name, names[1])
    spec = _around(name, heads, e, [(q, "weight", 1)], pn, proj.bias is not None, [q, pn])
    buffers = dict(m.named_buffers(recurse=False))
    at = _qkv_offsets(e, heads, getattr(m, "head_first", False) is True)
    for part, k in (("q", 0), ("k", 1), ("v", 2)):
        getattr(spec, part).append(((q, "weight", 0), at[k]))
        if qkv.bias is not None:
            getattr(spec, part).append(((q, "bias", 0), at[k]))
        if isinstance(getattr(m, f"{part}_bias", None), nn.Parameter) or f"{part}_bias" in buffers:
            getattr(spec, part).append(((name, f"{part}_bias", 0), 0))
    spec.per_head = per_head_slots(name, m, heads, skip=set(names[:2]))
    spec.seen_qk = [(q, "output", (at[0], at[1]), ("", ""))]
    spec.seen_v = [(q, "output", (at[2],), ("", "")), (pn, "input", (0,), ("", ""))]
    return spec


def _qkv_offsets(e: int, heads: int, head_first: bool) -> list:
    """Where q, k and v channel c sit in a qkv Linear's output, as offsets from c: q, k, v stacked ([q | k | v]), or
    with `head_first` (timm's MaxViT) each head's q, k, v together ([q0 k0 v0 | q1 k1 v1 | ...])."""
    if not head_first:
        return [0, e, 2 * e]
    d = e // heads
    head = torch.arange(e) // d
    return [2 * d * head + k * d for k in range(3)]


@recognise
def packed_qk_attention(name: str, m: nn.Module) -> Attention | None:
    """q and k from one Linear `qk` ([q | k]), v from another `v` (ConViT's gated positional self-attention)."""
    qk, v, proj, heads = (getattr(m, a, None) for a in ("qk", "v", "proj", "num_heads"))
    if not (all(isinstance(t, nn.Linear) for t in (qk, v, proj)) and isinstance(heads, int) and heads > 0):
        return None
    e = v.out_features
    if qk.out_features != 2 * e or proj.in_features != e or e % heads:
        return None
    q, vn, pn = _join(name, "qk"), _join(name, "v"), _join(name, "proj")
    spec = _around(name, heads, e, [(q, "weight", 1), (vn, "weight", 1)], pn, proj.bias is not None, [q, vn, pn])
    for part, layer, off, mod in (("q", q, 0, qk), ("k", q, e, qk), ("v", vn, 0, v)):
        getattr(spec, part).extend([((layer, "weight", 0), off)] + ([((layer, "bias", 0), off)] if mod.bias is not None else []))
    spec.per_head = per_head_slots(name, m, heads, skip={"qk", "v", "proj"})
    spec.seen_qk = [(q, "output", (0, e), ("", ""))]
    spec.seen_v = [(vn, "output", (0,), ("", "")), (pn, "input", (0,), ("", ""))]
    return spec


@recognise
def separate_qkv_attention(name: str, m: nn.Module) -> Attention | None:
    """q, k and v from three Linears (`q`, `k`, `v` or `wq`, `wk`, `wv`: CaiT's class attention, CrossViT's)."""
    proj, heads = getattr(m, "proj", None), getattr(m, "num_heads", None)
    names = next((n for n in (("q", "k", "v"), ("wq", "wk", "wv")) if all(isinstance(getattr(m, x, None), nn.Linear) for x in n)), None)
    if names is None or not (isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return None
    e = getattr(m, names[0]).out_features
    if {getattr(m, x).out_features for x in names} != {e} or proj.in_features != e or e % heads:
        return None
    q, k, v, pn = (_join(name, x) for x in (*names, "proj"))
    spec = _around(name, heads, e, [(x, "weight", 1) for x in (q, k, v)], pn, proj.bias is not None, [q, k, v, pn])
    for part, layer, child in zip(("q", "k", "v"), (q, k, v), names):
        getattr(spec, part).extend([((layer, "weight", 0), 0)] + ([((layer, "bias", 0), 0)] if getattr(m, child).bias is not None else []))
    spec.per_head = per_head_slots(name, m, heads, skip=set(names) | {"proj"})
    spec.seen_qk = [(q, "output", (0,), ("", "")), (k, "output", (0,), ("", ""))]
    spec.seen_v = [(v, "output", (0,), ("", "")), (pn, "input", (0,), ("", ""))]
    return spec


@recognise
def q_kv_attention(name: str, m: nn.Module) -> Attention | None:
    """q from a Linear `q`, k and v from one Linear `kv` ([k | v]) that may read a spatially reduced copy of the input
    (a strided conv `sr` and a LayerNorm `norm`: PVT v2's and Twins' sub-sampled attention)."""
    q, kv, proj, heads = (getattr(m, a, None) for a in ("q", "kv", "proj", "num_heads"))
    if not (all(isinstance(t, nn.Linear) for t in (q, kv, proj)) and isinstance(heads, int) and heads > 0):
        return None
    e = q.out_features
    sr, norm = getattr(m, "sr", None), getattr(m, "norm", None)
    if kv.out_features != 2 * e or proj.in_features != e or e % heads or (sr is not None and not isinstance(sr, nn.Conv2d)):
        return None
    qn, kvn, pn, srn, nn_ = (_join(name, x) for x in ("q", "kv", "proj", "sr", "norm"))
    reads = [(qn, "weight", 1), (srn if sr is not None else kvn, "weight", 1)]
    spec = _around(name, heads, e, reads, pn, proj.bias is not None, [qn, kvn, pn] + ([srn] if sr is not None else []))
    for part, layer, off, mod in (("q", qn, 0, q), ("k", kvn, 0, kv), ("v", kvn, e, kv)):
        getattr(spec, part).extend([((layer, "weight", 0), off)] + ([((layer, "bias", 0), off)] if mod.bias is not None else []))
    if sr is not None:
        if sr.groups != 1 or not isinstance(norm, nn.LayerNorm) or norm.normalized_shape != (sr.out_channels,):
            return None
        slots = [((srn, "weight", 0), "out", "layer")] + ([((srn, "bias", 0), "out", "layer")] if sr.bias is not None else [])
        slots += [((nn_, t, 0), "out", "norm") for t in ("weight", "bias") if getattr(norm, t, None) is not None]
        spec.inner.append((sr.out_channels, slots + [((kvn, "weight", 1), "in", "layer")], (kvn, "input", -1)))
    spec.per_head = per_head_slots(name, m, heads, skip={"q", "kv", "proj", "sr", "norm"})
    spec.seen_qk = [(qn, "output", (0,), ("", "")), (kvn, "output", (0,), ("", ""))]
    spec.seen_v = [(kvn, "output", (e,), ("", "")), (pn, "input", (0,), ("", ""))]
    return spec


class _Leaf(torch.autograd.Function):
    """The identity on an attention layer's output whose graph leads straight to its input: all a trace sees."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.new_zeros(ctx.shape), None


@contextmanager
def traced_as_leaves(model: nn.Module, layers: dict[str, Attention]) -> Iterator[None]:
    """In the block, every attention layer computes its output without autograd history inside it and hands it on
    through one node whose input is the layer's input (its queries): a graph trace sees input -> layer -> output.
    Keys or values from another tensor than the queries (cross-attention) are one error naming the layer."""
    patched = []

    def leaf(name: str, module: nn.Module, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if isinstance(module, nn.MultiheadAttention):
                kv = [*args[1:3], *(kwargs[k] for k in ("key", "value") if k in kwargs)]
                if any(t is not x for t in kv):
                    raise OtfuseError(
                        f"module {name} (MultiheadAttention) reads its keys or values from another tensor "
                        "than its queries; otfuse fuses self-attention only"
                    )
            with torch.no_grad():
                out = forward(*args, **kwargs)
            if isinstance(out, tuple):
                return (_Leaf.apply(x, out[0]), *out[1:])
            return _Leaf.apply(x, out)

        return run

    for name in layers:
        module = model.get_submodule(name)
        patched.append((module, module.__dict__.get("forward")))  # a forward set on the instance is put back as it was
        module.forward = leaf(name, module, module.forward)
    try:
        yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own


def per_head_slots(name: str, m: nn.Module, heads: int, skip: set[str]) -> list[Slot]:
    """The tensors inside an attention layer with one entry per head: a relative position bias table (entries, heads)
    or (heads, ...), a per-head scale (Swin V2's logit_scale, XCiT's temperature, ConViT's gate), and the heads'
    axes of every other Linear (the last layer of a position bias MLP, talking heads' mixing of the attention maps)."""
    out = []
    for child, mod in m.named_modules():
        if not child or child.split(".")[0] in skip:
            continue
        full = _join(name, child)
        if isinstance(mod, nn.Linear):
            out += [(full, "weight", 0)] + ([(full, "bias", 0)] if mod.bias is not None else []) if mod.out_features == heads else []
            # heads x heads (talking heads): a Linear reading 2 coordinates in a 2-head layer is not per head
            out += [(full, "weight", 1)] if mod.in_features == heads == mod.out_features else []
    for pname, t in m.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        if owner.split(".")[0] in skip:
            continue
        if leaf == "relative_position_bias_table" and t.ndim == 2 and t.shape[1] == heads:
            out.append((_join(name, owner), leaf, 1))
        elif leaf == "relative_position_bias_table" and t.ndim == 3 and t.shape[0] == heads:  # (heads, 2h - 1, 2w - 1): MaxViT's
            out.append((_join(name, owner), leaf, 0))
        elif leaf in ("logit_scale", "temperature", "gating_param") and t.ndim >= 1 and t.shape[0] == heads:
            out.append((_join(name, owner), leaf, 0))
    return out


class LeafPruner:
    """What DepGraph needs to trace an attention layer as one layer: its numbers of input and output channels, and
    distinct in/out handlers (no coupling between them inside the layer). otfuse never prunes, so they do nothing."""

    def __init__(self, model: nn.Module, layers: dict[str, Attention]):
        self._slots = {id(model.get_submodule(n)): (model, a) for n, a in layers.items()}

    def _size(self, layer: nn.Module, slot: Slot) -> int:
        model, _ = self._slots[id(layer)]
        module, tensor, axis = slot
        return getattr(model.get_submodule(module), tensor).shape[axis]

    def get_out_channels(self, layer: nn.Module) -> int:
        return self._size(layer, self._slots[id(layer)][1].outputs[0])

    def get_in_channels(self, layer: nn.Module) -> int:
        return self._size(layer, self._slots[id(layer)][1].inputs[0])

    def prune_out_channels(self, layer: nn.Module, idxs: list) -> nn.Module:
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: list) -> nn.Module:
        return layer

    def check(self, layer: nn.Module, idxs: list, to_output: bool) -> None:
        pass


def leaf_pruners(model: nn.Module, layers: dict[str, Attention]) -> dict[type, LeafPruner]:
    """Torch-Pruning's `customized_pruners` for `build_dependency`: every attention layer traced as one node
    (Torch-Pruning 1.6 traces customised layers by type)."""
    pruner = LeafPruner(model, layers)
    return {type(model.get_submodule(n)): pruner for n in layers}
