"""Tracing a model into its channel groups: DepGraph's trace, otfuse's recognisers, the groups, the refusals.

    groups = find_groups(model, example_input)     # forward order, the logits never grouped; not checked numerically

`otfuse.grouping.exact.channel_groups` is this plus the exactness check.
"""

from __future__ import annotations

import signal
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from otfuse.errors import OtfuseError
from otfuse.grouping import adapter
from otfuse.grouping.attention import attention_layers, leaf_pruners, traced_as_leaves
from otfuse.grouping.blocks import link_blocks
from otfuse.grouping.einsum import einsum_sites, traced_as_linears
from otfuse.grouping.group import CONV, CONV_T, ChannelGroup
from otfuse.grouping.heads import head_groups
from otfuse.grouping.members import to_groups
from otfuse.grouping.recognise import channel_first_maps, cut_token_mixing, repair_index_maps
from otfuse.grouping.shuffles import channel_convolution, channel_rearrangement, pixel_attention
from otfuse.hooks import tapping


def find_groups(model: nn.Module, example_input: torch.Tensor, time_limit: float = 300.0) -> list[ChannelGroup]:
    """Every permutable channel group of `model`, in forward order; the logits are never grouped.
    Not checked numerically: `otfuse.grouping.exact.channel_groups` is this plus that check.

    The model is traced in eval mode (a trace must not move BatchNorm statistics) on `example_input`,
    moved to the model's device. Anything otfuse cannot permute exactly is one OtfuseError naming it,
    and so is a grouping that takes longer than `time_limit` seconds (0: no limit; the limit needs
    the main thread)."""
    adapter.check_versions()
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
    sliding = channel_convolution(model.eval(), example_input)
    model.train(was_training)
    if sliding:
        raise OtfuseError(sliding)
    maps = channel_first_maps(model, example_input)
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
        ):
            graph = adapter.dependency_graph(model, example_input, leaf_pruners(model, attention), maps)
    except OtfuseError:
        raise
    except Exception as exc:  # a forward pass that fails, or a trace Torch-Pruning cannot follow
        raise OtfuseError(_trace_failure(model, example_input, exc, attention)) from None
    finally:
        model.train(was_training)
    if not layers:
        raise OtfuseError("the model has no conv or linear layer; nothing to align")
    heads = _heads(graph) | {layers[-1]}  # the last layer run produces the logits; a model may have more outputs
    names = {m: n for n, m in model.named_modules()} | stand_ins
    params_by_id = {id(p): n for n, p in model.named_parameters()}
    unwrapped = adapter.unwrapped_parameters(graph)
    try:
        with adapter.quiet(), _time_limited(time_limit):
            repair_index_maps(graph, tokens=bool(attention))
            last, mixing = cut_token_mixing(graph)
            groups = [
                g
                for items in adapter.coupled(graph, order, names, heads, last)
                for g in to_groups(items, names, order, params_by_id, unwrapped, attention, sites)
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
        raise OtfuseError(channel_rearrangement(model, example_input) or pixel_attention(model, attention) or str(exc)) from None
    except Exception as exc:  # Torch-Pruning's own failure on a layout it cannot index
        raise OtfuseError(_trace_failure(model, example_input, exc, attention)) from None
    groups += [g for spec in attention.values() for g in head_groups(spec, order)]
    groups.sort(key=lambda g: (g.order, g.name))
    link_blocks(model, groups)
    _refuse_tied(model, groups, attention)
    _say_uncovered(model, groups, {names[m] for m in heads} | mixing)
    return groups


def _refuse_tied(model: nn.Module, groups: list[ChannelGroup], attention: dict) -> None:
    """One error for a layer whose output channels the trace tied into a single group channel: nothing would align
    them, silently (Torch-Pruning 1.6 ties every channel of two tensors multiplied over their channel axis)."""
    for g in groups:
        tied = [m for m in g.members if m.role == "out" and m.kind == "layer" and m.tensor == "weight" and m.index.shape[1] > 1]
        if g.size == 1 and tied:
            raise OtfuseError(
                pixel_attention(model, attention)
                or f"{type(model).__name__}: the {tied[0].index.shape[1]} output channels of {tied[0].module} are tied into one "
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
        if any(type(h).__name__ == "WeightNorm" for h in adapter.forward_pre_hooks(mod)):
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


def _trace_failure(model: nn.Module, x: torch.Tensor, exc: Exception, attention: dict) -> str:
    """One line for a model that cannot be traced: its forward pass fails, or DepGraph cannot follow it."""
    first = " ".join(str(exc).split()[:16]) or type(exc).__name__
    try:
        with torch.no_grad():
            model(x)
    except Exception as forward:
        why = " ".join(str(forward).split()[:16]) or type(forward).__name__
        return f"the model cannot run on an example of shape {tuple(x.shape)} ({type(forward).__name__}: {why}); give an input it accepts"
    return (
        channel_rearrangement(model, x)
        or pixel_attention(model, attention)
        or (
            f"Torch-Pruning's DepGraph cannot trace {type(model).__name__}: {type(exc).__name__}: "
            f"{first}; otfuse cannot find its channel groups"
        )
    )


def _heads(graph) -> set[nn.Module]:
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
