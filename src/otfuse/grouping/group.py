"""The channel group: what moves together, where it is stored and where it can be seen.

    group.members          # the tensor axes that move: each a module, a tensor, an axis and the positions per channel
    group.observations     # where the channels are read (a consumer's input) or written (a producer's output)
    check_same_groups(a, b)   # two models' groups pair up, or one OtfuseError naming the first difference

Found by `otfuse.grouping.trace.find_groups`, checked by `otfuse.grouping.exact.channel_groups`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from otfuse.data import normalize
from otfuse.errors import OtfuseError
from otfuse.grouping.attention import Attention

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
    pinned: bool = False  # its blocks stay where they are (channels still move within them): see otfuse.grouping.blocks
    norm_blocks: dict[str, list[list[int]]] = field(default_factory=dict)  # per GroupNorm: each channel's positions in it
    attention: Attention | None = None  # the attention layer whose inner channels these are
    layout: str = ""  # and how they pair up there (one of LAYOUTS)

    def signature(self) -> tuple:
        return (self.name, self.size, tuple((m.module, m.tensor, m.axis, tuple(m.index.shape)) for m in self.members))


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


def depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels
