"""Channel shuffles: ops that interleave the channels of several groups, which no permutation of one group follows.

    why = channel_rearrangement(model, x)     # the refusal, in one line, or "" when the model has none

A shuffle passes DepGraph's trace and would pass for a reshape: the grouping refuses a model that has one by name,
before any wrong group is built or checked.
"""

from __future__ import annotations

import torch
from torch import nn

from otfuse.grouping.adapter import saved, view_sizes

CHANNEL_SHUFFLES = {"ChannelShuffleBackward0": "channel_shuffle"}


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
        if type(f).__name__ == "TransposeBackward0" and {saved(f, "dim0"), saved(f, "dim1")} == {1, 2} and _is_shuffle(f, consumer):
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


def _is_shuffle(transpose, consumer: dict) -> bool:
    """Whether a transpose(1, 2) sits between a view of an (N, C, H, W) map as (N, g, C / g, H, W) and a view
    back to four dimensions: not attention's (batch, tokens, dim) views, nor a flatten(2).transpose(1, 2)."""
    before = transpose.next_functions[0][0]
    after = consumer.get(transpose)
    while after is not None and type(after).__name__ == "CloneBackward0":  # .contiguous() before the view back
        after = consumer.get(after)
    return len(view_sizes(before)) == 4 and after is not None and len(view_sizes(after)) == 5
