"""Attention written in other shapes than plain q k^T v: each permutes exactly and the fusion oracle holds.

Hand-written after the layers users bring (no timm needed): XCiT's cross-covariance attention (q pairs with the
output, k with v), rotary position embeddings (q and k stay in place within a head), a relative position table
shared by every block (heads stay in place), MaxViT's head-first qkv with a (heads, 2h - 1, 2w - 1) table, ConViT's
gated positional attention (q and k from one Linear, v from another) and PVT v2's sub-sampled attention (k and v
read a strided conv of the input)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otfuse import channel_groups, permute, random_maps

from support import METHODS, assert_default_fusion_returns_model, assert_returns_model, random_data

# the shared table belongs to no group and is averaged as it stands (one warning says so): right, its heads stay put
pytestmark = pytest.mark.filterwarnings("ignore:Transformer. bias belong to no channel group")

E, HEADS, SIDE = 16, 4, 4  # width, heads, tokens per side (images of 8 px, patches of 2)


def _heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, heads, N, head_dim)
    return t.reshape(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:  # (B, heads, N, head_dim) -> (B, N, E)
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


class CrossCovariance(nn.Module):
    """XCiT's attention: softmax over channels of (q^T k) per head, applied to v."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.qkv, self.proj = HEADS, nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.temperature = nn.Parameter(torch.ones(HEADS, 1, 1))

    def forward(self, x, **_):
        q, k, v = (_heads(t).transpose(-2, -1) for t in self.qkv(x).chunk(3, -1))  # (B, heads, head_dim, N)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.temperature).softmax(-1)
        return self.proj(_merge((attn @ v).transpose(-2, -1)))


class Rotary(nn.Module):
    """Rotary position embedding on q and k: channel pairs (i, i + head_dim / 2) turned by a per-token angle."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.qkv, self.proj = HEADS, nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x, **_):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, -1))
        d = q.shape[-1] // 2
        angle = torch.arange(x.shape[1])[:, None] * torch.pow(100.0, -torch.arange(d) / d)
        turn = lambda t: torch.cat(
            [t[..., :d] * angle.cos() - t[..., d:] * angle.sin(), t[..., :d] * angle.sin() + t[..., d:] * angle.cos()], -1
        )
        return self.proj(_merge((turn(q) @ turn(k).transpose(-2, -1) / d**0.5).softmax(-1) @ v))


class SharedBias(nn.Module):
    """Plain attention plus a per-head bias handed in from outside: one table shared by every block."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.qkv, self.proj = HEADS, nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x, bias=None):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, -1))
        return self.proj(_merge((q @ k.transpose(-2, -1) + bias).softmax(-1) @ v))


class HeadFirst(nn.Module):
    """MaxViT's layout: each head's q, k and v side by side in the qkv output; a (heads, 2h - 1, 2w - 1) bias table."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.head_first, self.qkv, self.proj = HEADS, True, nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.relative_position_bias_table = nn.Parameter(torch.randn(HEADS, 2 * SIDE - 1, 2 * SIDE - 1))
        r = torch.arange(SIDE)
        rel = r[:, None] - r[None, :] + SIDE - 1  # (SIDE, SIDE)
        self.register_buffer("rows", rel[:, None, :, None].expand(SIDE, SIDE, SIDE, SIDE).reshape(SIDE * SIDE, -1))
        self.register_buffer("cols", rel[None, :, None, :].expand(SIDE, SIDE, SIDE, SIDE).reshape(SIDE * SIDE, -1))

    def forward(self, x, **_):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, HEADS, -1).transpose(1, 2).chunk(3, dim=3)
        bias = self.relative_position_bias_table[:, self.rows, self.cols]
        return self.proj(_merge((q @ k.transpose(-2, -1) + bias).softmax(-1) @ v))


class Gated(nn.Module):
    """ConViT's gated positional self-attention: [q | k] from one Linear, v from another, a per-head gate mixing the
    content attention with a positional one."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.qk, self.v, self.proj = HEADS, nn.Linear(E, 2 * E), nn.Linear(E, E), nn.Linear(E, E)
        self.pos_proj, self.gating_param = nn.Linear(3, HEADS), nn.Parameter(torch.randn(HEADS))
        self.register_buffer("rel", torch.randn(1, SIDE * SIDE, SIDE * SIDE, 3))

    def forward(self, x, **_):
        q, k = (_heads(t) for t in self.qk(x).chunk(2, -1))
        pos = self.pos_proj(self.rel).permute(0, 3, 1, 2).softmax(-1)
        g = torch.sigmoid(self.gating_param).view(1, -1, 1, 1)
        attn = (1 - g) * (q @ k.transpose(-2, -1)).softmax(-1) + g * pos
        return self.proj(_merge(attn @ _heads(self.v(x))))


class SubSampled(nn.Module):
    """PVT v2's attention: q from the tokens, k and v from one Linear reading a strided conv of them and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.q, self.kv, self.proj = HEADS, nn.Linear(E, E), nn.Linear(E, 2 * E), nn.Linear(E, E)
        self.sr, self.norm = nn.Conv2d(E, E, 2, stride=2), nn.LayerNorm(E)

    def forward(self, x, **_):
        b, n, c = x.shape
        r = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, SIDE, SIDE)).flatten(2).transpose(1, 2))
        k, v = (_heads(t) for t in self.kv(r).chunk(2, -1))
        return self.proj(_merge((_heads(self.q(x)) @ k.transpose(-2, -1)).softmax(-1) @ v))


class Transformer(nn.Module):
    """Patches of 2 px, two pre-norm blocks of the given attention and an MLP, mean over tokens, a classifier."""

    def __init__(self, attention: type[nn.Module]):
        super().__init__()
        self.embed = nn.Conv2d(3, E, 2, stride=2)
        self.norms = nn.ModuleList(nn.LayerNorm(E) for _ in range(4))
        self.attns = nn.ModuleList(attention() for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(E, 24), nn.GELU(), nn.Linear(24, E)) for _ in range(2))
        self.bias = nn.Parameter(torch.randn(HEADS, SIDE * SIDE, SIDE * SIDE)) if attention is SharedBias else None
        self.fc = nn.Linear(E, 10)

    def forward(self, x):
        h = self.embed(x).flatten(2).transpose(1, 2)
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
            h = h + attn(self.norms[2 * i](h), bias=self.bias)
            h = h + mlp(self.norms[2 * i + 1](h))
        return self.fc(h.mean(1))


def _model(attention: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = Transformer(attention)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


LAYERS = {CrossCovariance: "cross", Rotary: "rotary", SharedBias: "pinned", HeadFirst: "dot", Gated: "dot", SubSampled: "dot"}


@pytest.mark.parametrize("attention", LAYERS, ids=lambda a: a.__name__)
def test_each_attention_shape_permutes_exactly_in_its_layout(attention):
    model, x = _model(attention), torch.randn(3, 3, 2 * SIDE, 2 * SIDE)
    groups = channel_groups(model, x[:1])
    assert {g.layout for g in groups if g.attention is not None and g.name.count(":") and "inner" not in g.name} == {LAYERS[attention]}
    with torch.no_grad():
        ref = model(x)
        for seed in (1, 2):
            out = permute(model, groups, random_maps(groups, seed))(x)
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), f"seed {seed}"


def test_the_layouts_move_what_they_say():
    rotary = {g.name: g for g in channel_groups(_model(Rotary), torch.randn(1, 3, 8, 8))}
    assert rotary["attns.0:qk"].size == HEADS and rotary["attns.0:v"].size == E  # q, k: whole heads; v: channels
    cross = {g.name: g for g in channel_groups(_model(CrossCovariance), torch.randn(1, 3, 8, 8))}
    assert {(m.module, m.role) for m in cross["attns.0:q"].members} >= {("attns.0.qkv", "out"), ("attns.0.proj", "in")}
    pinned = [g for g in channel_groups(_model(SharedBias), torch.randn(1, 3, 8, 8)) if g.attention is not None]
    assert all(g.pinned for g in pinned) and not any(m.tensor == "bias" and m.module == "" for g in pinned for m in g.members)
    inner = [g for g in channel_groups(_model(SubSampled), torch.randn(1, 3, 8, 8)) if g.name == "attns.0:inner0"]
    assert {(m.module, m.role) for m in inner[0].members} >= {("attns.0.sr", "out"), ("attns.0.norm", "out"), ("attns.0.kv", "in")}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("attention", [CrossCovariance, Rotary, SubSampled], ids=lambda a: a.__name__)
def test_the_oracle_holds_for_attention_layouts(attention, method):
    assert_returns_model(_model(attention), random_data((3, 2 * SIDE, 2 * SIDE)), method, n_images=32)


@pytest.mark.parametrize("attention", [CrossCovariance, Rotary, SubSampled], ids=lambda a: a.__name__)
def test_the_default_fusion_with_refit_returns_the_model(attention):
    assert_default_fusion_returns_model(_model(attention), random_data((3, 2 * SIDE, 2 * SIDE)))
