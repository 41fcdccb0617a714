"""Exact on every CNN family a user brings: grouped convolutions (ResNeXt, RegNet), layer scale (ConvNeXt),
a clear refusal for channel shuffle (ShuffleNetV2), and never a raw exception from grouping or permuting."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import convnext, regnet, shufflenetv2
from torchvision.models.resnet import Bottleneck, ResNet

from otfuse import channel_groups, permute, random_maps
from otfuse.data import ImageData
from otfuse.errors import OtfuseError
from otfuse.fusion import fuse
from otfuse.models import build_model

from support import config, randomize_bn


def _resnext():
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4)


def _regnet():
    params = regnet.BlockParams(
        depths=[1, 1], widths=[8, 16], group_widths=[4, 4], bottleneck_multipliers=[1.0, 1.0], strides=[2, 2], se_ratio=0.25
    )
    return regnet.RegNet(params, num_classes=10, stem_width=8)


def _convnext():
    cfg = [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)]
    return convnext.ConvNeXt(cfg, stochastic_depth_prob=0.0, layer_scale=0.5, num_classes=10)


FAMILIES = {"resnext": _resnext, "regnet": _regnet, "convnext": _convnext, "resnext18": lambda: build_model("resnext18", 8, 3, 10)}


def _random(make) -> nn.Module:
    """Random weights, BatchNorm statistics and layer scales: a wrong permutation of any of them shows."""
    torch.manual_seed(0)
    model = randomize_bn(make())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model.eval()


def _data() -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    return ImageData("random", [str(i) for i in range(10)], x, y, x[:8], y[:8], x[:8], y[:8], (0.5,) * 3, (0.25,) * 3, False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_random_group_permutations_keep_the_function(family):
    model = _random(FAMILIES[family])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    groups = channel_groups(model, x[:1])
    for seed in (1, 2):
        out = permute(model, groups, random_maps(groups, seed))
        with torch.no_grad():
            a, b = model(x), out(x)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_grouped_convs_link_their_input_and_output_blocks():
    model = _random(_resnext)
    groups = {g.name: g for g in channel_groups(model, torch.randn(1, 3, 32, 32))}
    inner, outer = groups["layer1.0.conv1"], groups["layer1.0.conv2"]  # read and written by layer1.0.conv2 (4 groups)
    assert inner.family == outer.family and inner.blocks is not None
    assert sorted(inner.blocks.tolist()) == [b for b in range(4) for _ in range(len(inner.blocks) // 4)]


@pytest.mark.parametrize("method", ["activation", "weight", "weight-matching"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fusing_a_model_with_a_permuted_copy_returns_it(family, method):
    model, data = _random(FAMILIES[family]), _data()
    groups = channel_groups(model, torch.randn(1, 3, 32, 32))
    copy_ = permute(model, groups, random_maps(groups, seed=4))
    raw = fuse([model, copy_], data.train_x, data.norm, config(method=method, n_images=32, bn_batches=0, refit=False)).fused_no_bn
    ref = model.state_dict()
    for k, v in raw.state_dict().items():
        assert torch.allclose(v.float(), ref[k].float(), atol=1e-5), f"{family}/{method}: {k}"


def test_channel_shuffle_is_refused_in_one_line_naming_it():
    model = shufflenetv2.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=10).eval()
    with pytest.raises(OtfuseError, match=r"shuffles channels \(view as groups, transpose\(1, 2\), view back\)"):
        channel_groups(model, torch.randn(1, 3, 32, 32))


class Scaled(nn.Module):
    """A user's block with a learned per-channel scale held by the model, not by a module otfuse knows."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc((torch.relu(self.a(x)) * self.scale).mean((2, 3)))


class Holder(nn.Module):
    """A leaf module of the user's that holds a per-channel tensor: DepGraph sees the tensor, which moves with its group."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(6, 1, 1))

    def forward(self, x):
        return x + self.bias


class HeldBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.h = Holder()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.h(self.a(x))).mean((2, 3)))


class Recurrent(nn.Module):
    """Channels read by a module DepGraph knows but otfuse cannot permute (a GRU's gates are packed in its weights)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.rnn = nn.GRU(8, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.rnn(torch.relu(self.a(x)))[0].mean(1))


@pytest.mark.parametrize("make,tensor", [(Scaled, "scale"), (HeldBias, "bias")], ids=["model-scale", "leaf-module-bias"])
def test_a_bare_per_channel_parameter_moves_with_its_group(make, tensor):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(3, 3, 8, 8)
    groups = channel_groups(model, x[:1])
    assert any(m.tensor == tensor and m.kind == "other" for g in groups for m in g.members)
    out = permute(model, groups, random_maps(groups, 1))
    with torch.no_grad():
        assert torch.allclose(model(x), out(x), atol=1e-6)


def test_a_module_otfuse_cannot_permute_is_refused_by_name():
    with pytest.raises(OtfuseError, match=r"module rnn \(GRU\) holds tensors in a channel group"):
        channel_groups(Recurrent().eval(), torch.randn(1, 5, 4))


def test_grouping_never_moves_a_training_models_statistics_and_keeps_its_mode():
    model = randomize_bn(build_model("resnet18", 4, 3, 10)).train()
    before = copy.deepcopy(model.state_dict())
    channel_groups(model, torch.randn(2, 3, 16, 16))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_input_the_model_cannot_take_is_one_clear_error():
    with pytest.raises(OtfuseError, match=r"cannot run on an example of shape \(1, 1, 16, 16\)"):
        channel_groups(build_model("resnet18", 4, 3, 10).eval(), torch.randn(1, 1, 16, 16))


def test_a_grouping_that_runs_out_of_time_is_one_clear_error():
    model = _random(FAMILIES["resnext"])
    with pytest.raises(OtfuseError, match="did not finish grouping ResNet's channels in 0 s"):
        channel_groups(model, torch.randn(1, 3, 32, 32), time_limit=1e-4)
    assert len(channel_groups(model, torch.randn(1, 3, 32, 32))) > 0  # the alarm is gone afterwards


class Tokens(nn.Module):
    """Patches as tokens (flatten(2).transpose(1, 2), as vision transformers do), then a Linear: not a shuffle."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, 2)
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mlp(self.patch(x).flatten(2).transpose(1, 2))).mean(1))


def test_tokens_made_by_a_transpose_are_not_taken_for_a_channel_shuffle():
    torch.manual_seed(0)
    model, x = Tokens().eval(), torch.randn(2, 3, 8, 8)
    groups = channel_groups(model, x[:1])
    out = permute(model, groups, random_maps(groups, seed=1))
    assert torch.allclose(model(x), out(x), atol=1e-5)
