"""Layouts refused by name: channel shuffles (ops that interleave the channels of several groups, which no
permutation of one group follows) and self-attention over pixels with position tables shared by its heads.

    why = channel_rearrangement(model, x)     # the refusal, in one line, or "" when the model has none
    why = pixel_attention(model, attention_layers(model))
    why = channel_convolution(model, x)       # a conv that slides along the channels (ECA)

A shuffle passes DepGraph's trace and would pass for a reshape; attention over pixels fails it in ways that name
other causes (indices that grow without end, channels tied into one): where grouping fails, these say why.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from otfuse.grouping.adapter import input_shapes, saved, view_sizes
from otfuse.grouping.group import CONV

CHANNEL_SHUFFLES = {"ChannelShuffleBackward0": "channel_shuffle"}


def _backward_nodes(model: nn.Module, x: torch.Tensor, consumer: dict | None = None) -> Iterator:
    """Every node of the autograd graph of `model(x)` (none when the forward pass fails: the trace that follows says
    why), each yielded before the nodes it reads; `consumer` gets, per node, the first node seen using its output."""
    with torch.enable_grad():
        try:
            out = model(x)
        except Exception:
            return
    seen, todo = set(), [out.grad_fn] if isinstance(out, torch.Tensor) else []
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        yield f
        for n, _ in f.next_functions:
            if n is not None:
                if consumer is not None:
                    consumer.setdefault(n, f)
                todo.append(n)


def channel_rearrangement(model: nn.Module, x: torch.Tensor) -> str:
    """The refusal for an op that moves channels otfuse does not follow (a channel shuffle: a view of the channels
    as (groups, channels / groups), transposed), or "" when the model has none."""
    consumer: dict = {}  # backward node -> the node that used its output (the step after it in the forward pass)
    for f in _backward_nodes(model, x, consumer):
        if type(f).__name__ in CHANNEL_SHUFFLES:
            return (
                f"{type(model).__name__} uses {CHANNEL_SHUFFLES[type(f).__name__]}, which interleaves the channels of its "
                "groups, so no permutation of one group keeps the function; otfuse refuses it rather than fuse it wrongly"
            )
        if type(f).__name__ == "TransposeBackward0" and {saved(f, "dim0"), saved(f, "dim1")} == {1, 2} and _is_shuffle(f, consumer):
            return (
                f"{type(model).__name__} shuffles channels (view as groups, transpose(1, 2), view back): the shuffle "
                "interleaves the channels of two branches, so no permutation of one branch keeps the function; "
                "otfuse refuses it rather than fuse it wrongly"
            )
    return ""


def _is_shuffle(transpose, consumer: dict) -> bool:
    """Whether a transpose(1, 2) sits between a view of an (N, C, H, W) map as (N, g, C / g, H, W) and a view
    back to four dimensions: not attention's (batch, tokens, dim) views, nor a flatten(2).transpose(1, 2)."""
    before = transpose.next_functions[0][0]
    after = consumer.get(transpose)
    while after is not None and type(after).__name__ == "CloneBackward0":  # .contiguous() before the view back
        after = consumer.get(after)
    return len(view_sizes(before)) == 4 and after is not None and len(view_sizes(after)) == 5


def pixel_attention(model: nn.Module, attention: dict) -> str:
    """The refusal for a layer the trace failed on that is self-attention over a feature map's pixels, its q, k and v
    made by convolutions, with relative position embeddings or position lambdas (BoTNet, HaloNet, LambdaNet): q and k
    index position tables shared by every head, a layout `otfuse.grouping.attention` does not recognise. "" when the
    model has no such layer (the failure has another cause)."""
    for name, mod in model.named_modules():
        if name in attention or not isinstance(getattr(mod, "num_heads", None), int):
            continue
        if not any(isinstance(c, CONV) for c in mod.children()):
            continue
        positions = [n for n, _ in mod.named_parameters() if "pos" in n or "rel" in n]
        positions += [n for n, c in mod.named_children() if isinstance(c, nn.Conv3d)]
        if positions:
            return (
                f"module {name} ({type(mod).__name__}) is self-attention over a feature map's pixels, its q, k and v made by "
                f"convolutions and its positions by {', '.join(positions[:2])}: otfuse recognises attention layers with "
                "linear projections and per-head position tables (docs/architectures.md), not this layout, and refuses it "
                "rather than fuse it wrongly"
            )
    return ""


def channel_convolution(model: nn.Module, x: torch.Tensor) -> str:
    """The refusal for a convolution that slides along the channel axis (ECA's channel attention: the pooled (N, C)
    channels viewed as (N, 1, C), a Conv1d weighing each channel with its neighbours), or "" when the model has none.
    No permutation keeps a channel's neighbours, and DepGraph's index maps through that view grow until the time limit:
    found first, in one forward pass."""
    params = {id(p): n for n, p in model.named_parameters()}
    for f in _backward_nodes(model, x):
        view = f.next_functions[0][0] if type(f).__name__ == "ConvolutionBackward0" else None
        before = view_sizes(view) if view is not None else ()
        after = tuple(input_shapes(view)[0]) if view is not None and input_shapes(view) else ()
        if len(before) >= 2 and before[1] > 1 and len(after) >= 3 and after[1] == 1 and after[-1] == before[1]:
            weight = getattr(f.next_functions[1][0], "variable", None)
            if weight is not None and weight.shape[2:].numel() == 1:
                continue  # a kernel of one: every channel scaled alike, which any permutation keeps
            name = params.get(id(weight), "a convolution").rpartition(".")[0] or "a convolution"
            return (
                f"module {name} convolves along the channel axis (the channels viewed as a sequence, as ECA's channel "
                "attention does): each channel is weighed with its neighbours, which no permutation keeps; otfuse "
                "refuses it rather than fuse it wrongly"
            )
    return ""
