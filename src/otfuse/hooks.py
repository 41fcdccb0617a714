"""One way to read the tensors a model computes inside: forward hooks on named modules.

    with tapping(model, [("layer1.0.bn1", "output", seen.append), ("fc", "input", print)]):
        model(x)
    x_fc = tapped(model, "fc", "input", x)      # runs the model only as far as fc

A tap is (module name, "input" or "output", callback); the callback gets the module's first
input or its output. Hooks are always removed, even when the forward pass raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from otfuse.errors import OtfuseError

Tap = tuple[str, str, Callable[[torch.Tensor], None]]


class _Reached(Exception):
    """Raised by a tap once its tensor is captured: the rest of the forward pass is not needed."""


@contextmanager
def tapping(model: nn.Module, taps: Iterable[Tap]) -> Iterator[None]:
    """Call each tap's callback with the named module's first input or its output on every forward pass."""
    handles = []
    try:
        for name, where, fn in taps:
            module = model.get_submodule(name)
            if where == "input":
                handles.append(module.register_forward_pre_hook(lambda _m, args, fn=fn: fn(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda _m, _args, out, fn=fn: fn(out)))
        yield
    finally:
        for h in handles:
            h.remove()


def tapped(model: nn.Module, name: str, where: str, x: torch.Tensor) -> torch.Tensor:
    """The input or output of module `name` on batch `x`, running the model no further than that."""
    box: list[torch.Tensor] = []

    def take(t: torch.Tensor) -> None:
        box.append(t)
        raise _Reached

    with tapping(model, [(name, where, take)]):
        try:
            model(x)
        except _Reached:
            pass
    if not box:
        raise OtfuseError(f"module {name} is not reached by the forward pass; it cannot be observed")
    return box[0]
