"""One way to read the tensors a model computes inside: forward hooks on named modules.

    with tapping(model, [("layer1.0.bn1", "output", seen.append), ("fc", "input", print)]):
        model(x)

A tap is (module name, "input" or "output", callback); the callback gets the module's first
input or its output. Hooks are always removed, even when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Tap = tuple[str, str, Callable[[torch.Tensor], None]]


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
