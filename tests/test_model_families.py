"""Constructs users bring beyond the zoo: learned position maps, several outputs, layers the grouping cannot see,
maxout units, einsum with a parameter, and channel layouts refused in one line rather than fused wrongly."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otfuse import channel_groups, permute, random_maps
from otfuse.errors import OtfuseError, run_main

from support import METHODS, EinsumOnMaps, assert_default_fusion_returns_model, assert_returns_model, random_data, randomize_bn


class PositionMap(nn.Module):
    """A learned (1, C, H, W) map added to a conv's output (H, W differ from C: the channels are on dim 1)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)
        self.pos = nn.Parameter(torch.randn(1, 8, 6, 6))

    def forward(self, x):
        return self.fc(self.c2(F.relu(self.c1(x) + self.pos)).mean((2, 3)))


class TwoHeads(nn.Module):
    """Two outputs from one trunk: each head's features are an output, never permuted."""

    def __init__(self):
        super().__init__()
        self.c1, self.h1, self.h2 = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10), nn.Linear(8, 4)

    def forward(self, x):
        f = F.relu(self.c1(x)).mean((2, 3))
        return self.h1(f), self.h2(f)


class Functional(nn.Module):
    """Convolutions called through F.conv2d with the module's own tensors: no layer the grouping can see."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8, 8, 3, 3))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.conv2d(F.relu(F.conv2d(x, self.w1, padding=1)), self.w2, padding=1).mean((2, 3)))


class Maxout(nn.Module):
    """Channel pairs reduced by a max: units of two channels made by a view; each unit moves as a whole."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        y = self.c1(x)
        return self.fc(self.c2(y.view(y.shape[0], 8, 2, *y.shape[2:]).amax(2)).mean((2, 3)))


class LinearMaxout(nn.Module):
    """Maxout after a Linear: (N, 16) viewed as (N, 8, 2), the max over the last dim."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 16), nn.Linear(8, 10)

    def forward(self, x):
        return self.b(self.a(x.flatten(1)).view(-1, 8, 2).amax(-1))


class NormedTriples(nn.Module):
    """A BatchNorm before units of three channels reduced by torch.max (a reshape, not a view)."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2, self.fc = nn.Conv2d(3, 18, 3, padding=1), nn.BatchNorm2d(18), nn.Conv2d(6, 8, 3), nn.Linear(8, 10)

    def forward(self, x):
        y = self.bn(self.c1(x))
        return self.fc(self.c2(y.reshape(y.shape[0], 6, 3, *y.shape[2:]).max(2)[0]).mean((2, 3)))


class Einsum(nn.Module):
    """Channels mixed by einsum with a bare parameter: pooled, then a Linear written as einsum."""

    def __init__(self):
        super().__init__()
        self.c1, self.w, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(8, 6)), nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(torch.einsum("nchw,cd->nd", F.relu(self.c1(x)), self.w))


class EinsumOnTokens(nn.Module):
    """Tokens (batch, tokens, channels) through an einsum Linear and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.e, self.w, self.n, self.fc = nn.Linear(3, 8), nn.Parameter(torch.randn(8, 12)), nn.LayerNorm(12), nn.Linear(12, 10)

    def forward(self, x):
        h = F.gelu(self.e(x.flatten(2).transpose(1, 2)))
        return self.fc(self.n(torch.einsum("ntc,cd->ntd", h, self.w)).mean(1))


class EinsumHead(nn.Module):
    """The classifier itself an einsum: its outputs are the logits, never permuted."""

    def __init__(self):
        super().__init__()
        self.c, self.w = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(8, 10))

    def forward(self, x):
        return torch.einsum("nc,cd->nd", F.relu(self.c(x)).mean((2, 3)), self.w)


class EinsumOverSpace(nn.Module):
    """An einsum whose parameter contracts a spatial axis: no Linear over channels (refused by name)."""

    def __init__(self):
        super().__init__()
        self.c1, self.w, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Parameter(torch.randn(6, 6)), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.einsum("nchw,wd->ncd", self.c1(x), self.w).mean(2))


class ConvAttention(nn.Module):
    """SAGAN's self-attention: q, k and v from 1 x 1 convs, softmax(q^T k) over positions, a residual (refused by name:
    the trace ties the block's channels into one)."""

    def __init__(self):
        super().__init__()
        self.c, self.q, self.k, self.v, self.fc = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 4, 1),
            nn.Conv2d(16, 4, 1),
            nn.Conv2d(16, 16, 1),
            nn.Linear(16, 10),
        )

    def forward(self, x):
        x = F.relu(self.c(x))
        attn = torch.bmm(self.q(x).flatten(2).transpose(1, 2), self.k(x).flatten(2)).softmax(-1)
        return self.fc((torch.bmm(self.v(x).flatten(2), attn.transpose(1, 2)).view(x.shape) + x).mean((2, 3)))


def _exact(model: nn.Module, x: torch.Tensor) -> list:
    groups = channel_groups(model, x[:1])
    out = permute(model, groups, random_maps(groups, seed=3))
    with torch.no_grad():
        for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (model(x), out(x)))):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    return groups


def test_a_learned_position_map_moves_with_the_channels_on_dim_1():
    torch.manual_seed(0)
    groups = _exact(PositionMap().eval(), torch.randn(2, 3, 6, 6))
    assert any(m.tensor == "pos" and m.axis == 1 for g in groups for m in g.members)


@pytest.mark.parametrize("method", METHODS)
def test_the_oracle_holds_with_a_position_map(method):
    torch.manual_seed(0)
    assert_returns_model(PositionMap().eval(), random_data((3, 6, 6)), method, n_images=32)


def test_every_head_of_a_model_with_two_outputs_keeps_its_outputs():
    torch.manual_seed(0)
    groups = _exact(TwoHeads().eval(), torch.randn(2, 3, 6, 6))
    outputs = {(m.module, m.tensor) for g in groups for m in g.members if m.role == "out"}
    assert ("c1", "weight") in outputs and not {("h1", "weight"), ("h2", "weight")} & outputs


def test_layers_no_group_covers_are_named_in_one_warning():
    torch.manual_seed(0)
    with pytest.warns(
        UserWarning, match=r"Functional: w1, w2 belong to no channel group, so fusion averages them as they stand.*nn.Conv2d"
    ):
        channel_groups(Functional().eval(), torch.randn(1, 3, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model every layer of which is grouped says nothing
        channel_groups(PositionMap().eval(), torch.randn(1, 3, 6, 6))


def test_a_command_shows_that_warning_as_one_line(capsys):
    def command() -> int:
        channel_groups(Functional().eval(), torch.randn(1, 3, 6, 6))
        return 0

    assert run_main(command) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("otfuse: warning: Functional: w1, w2 belong to no channel group")


UNITS = [(Maxout, (3, 6, 6), 2), (LinearMaxout, (3, 2, 2), 2), (NormedTriples, (3, 6, 6), 3)]


@pytest.mark.parametrize("model, shape, k", UNITS)
def test_channel_units_of_a_view_and_reduce_move_as_blocks(model, shape, k):
    torch.manual_seed(0)
    groups = _exact(model().eval(), torch.randn(2, *shape))
    first = groups[0]
    assert first.size * k == next(m for m in first.members if m.role == "out").index.numel()
    assert next(m for m in first.members if m.role == "out").index.shape[1] == k  # a unit's k channels are one group channel


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model, shape, k", UNITS[::2])
def test_the_oracle_holds_with_channel_units(model, shape, k, method):
    torch.manual_seed(0)
    assert_returns_model(model().eval(), random_data(shape), method, n_images=32)


EINSUMS = [Einsum, EinsumOnMaps, EinsumOnTokens, EinsumHead]


@pytest.mark.parametrize("model", EINSUMS)
def test_an_einsum_with_a_parameter_moves_the_parameter_as_a_linear(model):
    torch.manual_seed(0)
    net = model().eval()
    groups = _exact(net, torch.randn(2, 3, 6, 6))
    axes = {m.axis for g in groups for m in g.members if m.tensor == "w"}
    assert axes == ({0} if model is EinsumHead else {0, 1})  # the head's outputs stay: only its input axis moves
    assert not any("_otfuse_" in n for n, _ in net.named_modules()) and torch.einsum.__module__ == "torch.functional"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", [Einsum, EinsumOnMaps])
def test_the_oracle_holds_with_an_einsum(model, method):
    torch.manual_seed(0)
    assert_returns_model(model().eval(), random_data((3, 6, 6)), method, n_images=32)


def test_an_einsum_that_is_no_linear_over_channels_is_refused_in_one_line():
    torch.manual_seed(0)
    with pytest.raises(OtfuseError, match=r"parameter w: torch.einsum\('nchw,wd->ncd'\) mixes channels") as info:
        channel_groups(EinsumOverSpace().eval(), torch.randn(1, 3, 6, 6))
    assert "\n" not in str(info.value)


def test_channels_tied_into_one_are_refused_not_left_unaligned():
    torch.manual_seed(0)
    with pytest.raises(OtfuseError, match="ConvAttention: the 16 output channels of c are tied into one") as info:
        channel_groups(ConvAttention().eval(), torch.randn(1, 3, 6, 6))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("model", [Maxout, LinearMaxout, EinsumOnMaps, EinsumOnTokens])
def test_the_default_fusion_with_refit_returns_the_model(model):
    """Alignment, averaging, BatchNorm and the refit of every layer that runs as a module: the model comes back."""
    torch.manual_seed(0)
    data = random_data((3, 6, 6) if model is not LinearMaxout else (3, 2, 2))
    assert_default_fusion_returns_model(model().eval(), data)


class SeparableAttention(nn.Module):
    """Separable self-attention (MobileViTv2's): one 1 x 1 conv makes one context-score channel and d keys and d
    values; the scores, softmaxed over the tokens, are broadcast over the keys, summed into a context vector that
    gates the values. Key i goes with value i; the score channel goes with no other."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.d = d
        self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.qkv, self.out = nn.Conv2d(8, 1 + 2 * d, 1), nn.Conv2d(d, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.c(x)))
        q, k, v = self.qkv(x).split([1, self.d, self.d], dim=1)  # rows as patches, columns as tokens: (B, C, P, N)
        context = (k * q.softmax(-1)).sum(-1, keepdim=True)
        y = self.out(F.relu(v) * context.expand_as(v))
        return self.fc((x + y).mean((2, 3)))


def test_separable_self_attention_groups_keys_with_values_and_the_score_channel_alone():
    """A one-channel tensor broadcast over C channels shares no channel with them: the keys and values form one group
    of d channels (two positions each in the conv that makes them), the score channel a group of its own."""
    torch.manual_seed(0)
    groups = _exact(randomize_bn(SeparableAttention()).eval(), torch.randn(2, 3, 6, 6))
    qkv = {g.size: m.index.shape[1] for g in groups for m in g.members if (m.module, m.tensor, m.role) == ("qkv", "weight", "out")}
    assert qkv == {6: 2, 1: 1}


@pytest.mark.parametrize("method", METHODS)
def test_the_oracle_holds_with_separable_self_attention(method):
    torch.manual_seed(0)
    assert_returns_model(randomize_bn(SeparableAttention()).eval(), random_data((3, 6, 6)), method, n_images=32)


class GlobalContext(nn.Module):
    """A global-context block (GCNet's, timm's GlobalContext): a 1 x 1 conv makes one attention channel, softmaxed over
    space; a batched product pools every channel with those weights into a context vector that gates the features."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.attn, self.fc1, self.fc2 = nn.Conv2d(c, 1, 1), nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.c(x)))
        b, c, h, w = x.shape
        weights = self.attn(x).reshape(b, 1, h * w).softmax(-1).unsqueeze(3)  # (B, 1, HW, 1)
        context = (x.reshape(b, c, h * w).unsqueeze(1) @ weights).view(b, c, 1, 1)
        return self.head((x * torch.sigmoid(self.fc2(F.relu(self.fc1(context))))).mean((2, 3)))


def test_a_global_context_block_pools_the_channels_it_gates_and_its_attention_channel_is_alone():
    """The pooling weights' positions are no channels of the features they pool: the features, the context and the
    gate are one group, the attention channel a group of its own (refused before as "a recurrent computation")."""
    torch.manual_seed(0)
    groups = _exact(randomize_bn(GlobalContext()).eval(), torch.randn(2, 3, 6, 6))
    assert sorted((g.name, g.size) for g in groups) == [("attn", 1), ("c", 8), ("fc1", 4)]


@pytest.mark.parametrize("method", METHODS)
def test_the_oracle_holds_with_a_global_context_block(method):
    torch.manual_seed(0)
    assert_returns_model(randomize_bn(GlobalContext()).eval(), random_data((3, 6, 6)), method, n_images=32)


class PixelAttention(nn.Module):
    """Self-attention over a feature map's pixels (BoTNet's): q, k and v from one 1 x 1 conv, relative position logits
    from q times a position table every head shares."""

    def __init__(self, c: int = 8, side: int = 4, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.dim_head = num_heads, c // num_heads
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.pos_rel = nn.Parameter(torch.randn(side * side, self.dim_head) * 0.1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b * self.num_heads, 3 * self.dim_head, h * w).split(self.dim_head, dim=1)
        logits = q.transpose(1, 2) @ k + q.transpose(1, 2) @ self.pos_rel.t()
        return (v @ logits.softmax(-1).transpose(1, 2)).reshape(b, c, h, w)


class BoT(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.attn, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), PixelAttention(), nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.c(x)))
        return self.head((x + self.attn(x)).mean((2, 3)))


def test_attention_over_pixels_with_relative_positions_is_refused_by_its_name():
    """Not as "a recurrent computation", as it once was: the refusal names the layer and what it is."""
    with pytest.raises(OtfuseError, match=r"module attn \(PixelAttention\) is self-attention over a feature map's pixels.*pos_rel"):
        channel_groups(BoT().eval(), torch.randn(1, 3, 4, 4))


class ChannelConv(nn.Module):
    """Efficient channel attention (ECA): the pooled channels viewed as a sequence and convolved, each channel weighed
    with its neighbours, `k` the kernel's length."""

    def __init__(self, k: int):
        super().__init__()
        self.c, self.eca, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv1d(1, 1, k, padding=k // 2), nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.c(x))
        gate = torch.sigmoid(self.eca(x.mean((2, 3)).view(x.shape[0], 1, -1))).view(x.shape[0], -1, 1, 1)
        return self.head((x * gate).mean((2, 3)))


def test_a_convolution_along_the_channels_is_refused_by_name():
    """Refused at once, not after the trace's time limit (timm's ECA ResNets ran past 120 s): a channel's neighbours
    move under any permutation."""
    with pytest.raises(OtfuseError, match=r"module eca convolves along the channel axis"):
        channel_groups(ChannelConv(3).eval(), torch.randn(1, 3, 6, 6))
