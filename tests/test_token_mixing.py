"""Token-mixing MLPs (MLP-Mixer, ResMLP, gMLP): layers that act along the tokens, the same way for every channel.

The channels and the token MLPs' hidden units are two independent families of groups; the tokens themselves stay put.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from otfuse import channel_groups, permute, random_maps
from otfuse.errors import OtfuseError

from support import METHODS, assert_returns_model, random_data, randomize_constants


class MixerBlock(nn.Module):
    """Token MLP over the transposed (batch, channels, tokens) map, then a channel MLP; `gate`: gMLP's spatial gating
    (half the hidden channels times a token-mixed other half) in place of the token MLP."""

    def __init__(self, dim: int, tokens: int, gate: bool = False):
        super().__init__()
        self.gate = gate
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if gate:
            self.fc1, self.gate_norm, self.proj, self.fc2 = (
                nn.Linear(dim, 2 * dim),
                nn.LayerNorm(dim),
                nn.Linear(tokens, tokens),
                nn.Linear(dim, dim),
            )
        else:
            self.tok1, self.tok2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)
        self.ch1, self.ch2 = nn.Linear(dim, 3 * dim), nn.Linear(3 * dim, dim)

    def forward(self, x):
        if self.gate:
            u, v = nn.functional.gelu(self.fc1(self.norm1(x))).chunk(2, dim=-1)
            v = self.proj(self.gate_norm(v).transpose(-1, -2)).transpose(-1, -2)
            x = x + self.fc2(u * v)
        else:
            t = self.norm1(x).transpose(1, 2)
            x = x + self.tok2(nn.functional.gelu(self.tok1(t))).transpose(1, 2)
        return x + self.ch2(nn.functional.gelu(self.ch1(self.norm2(x))))


class Mixer(nn.Module):
    def __init__(self, dim: int = 12, patch: int = 4, size: int = 16, blocks: int = 2, gate: bool = False):
        super().__init__()
        tokens = (size // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(dim, tokens, gate) for _ in range(blocks)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def _mixer(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize_constants(Mixer(**kwargs)).eval()


def _assert_permutes_exactly(model: nn.Module, x: torch.Tensor) -> list:
    groups = channel_groups(model, x[:1])
    out = permute(model, groups, random_maps(groups, seed=3))
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-4)
    return groups


def test_channels_and_token_hidden_units_are_two_families_of_groups():
    groups = _assert_permutes_exactly(_mixer(), torch.randn(4, 3, 16, 16))
    names = {g.name: {m.module for m in g.members} for g in groups}
    assert len(groups) == 1 + 2 + 2  # the channel stream, each block's channel MLP and token MLP hidden units
    token_hidden = [g for g, members in names.items() if "blocks.0.tok2" in members]
    assert token_hidden and names[token_hidden[0]] == {"blocks.0.tok1", "blocks.0.tok2"}
    stream = max(names.values(), key=len)
    assert not {"blocks.0.tok1", "blocks.1.tok2"} & stream  # token layers carry no channel: none permuted by the stream


def test_spatial_gating_couples_the_gate_halves_through_the_token_layer():
    groups = _assert_permutes_exactly(_mixer(gate=True), torch.randn(4, 3, 16, 16))
    assert not any(m.module.endswith(".proj") for g in groups for m in g.members)  # the token layer: no group, tokens stay put


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_the_oracle_holds_for_token_mixing_models(method, gate):
    assert_returns_model(_mixer(gate=gate), random_data((3, 16, 16)), method, n_images=32)


class TokenLeak(nn.Module):
    """A token layer whose output is added to the channels before it is transposed back (square maps make the
    shapes agree): the channels are mixed along with the tokens, so no channel permutation keeps the function."""

    def __init__(self):
        super().__init__()
        self.stem, self.tok, self.head = nn.Conv2d(3, 16, 4, 4), nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        t = self.tok(x.transpose(1, 2))
        return self.head((x + t).transpose(1, 2).mean(1))


def test_a_token_layer_joined_with_the_channels_is_refused_not_fused_wrongly():
    torch.manual_seed(0)
    with pytest.raises(OtfuseError, match="TokenLeak"):
        channel_groups(TokenLeak().eval(), torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("name", ["mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224"])
def test_timm_token_mixing_families_permute_exactly(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_constants(timm.create_model(name, pretrained=False, num_classes=10, img_size=64)).eval()
    assert len(_assert_permutes_exactly(model, torch.randn(2, 3, 64, 64))) > 1
