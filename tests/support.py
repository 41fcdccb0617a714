"""Shared test models and helpers: small models with randomised BatchNorm statistics, the oracle assertions, the
patterns users write, and bench scripts imported as modules (`from support import ...`; the fixtures are in conftest)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from otfuse import channel_groups, permute, random_maps
from otfuse.data import ImageData, normalize
from otfuse.fusion import FuseConfig, fuse
from otfuse.options import build


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random affine parameters and running statistics, so a wrong permutation of BN shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def randomize_constants(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter initialised to one constant or near zero (a zero or 1e-3-scaled classifier,
    LayerNorm's ones and zeros, a class token, a layer scale): a wrong permutation of it, or behind it, shows in the
    outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and (bool((p == p.flatten()[0]).all()) or float(p.abs().max()) < 1e-3):
                p.add_(torch.randn(p.shape, generator=g) * 0.25 * max(1.0, float(p.flatten()[0].abs())))
    return model


class CatNet(nn.Module):
    """Two branches concatenated, a depthwise conv, then a Linear after a flatten."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.b(x))], 1)
        x = torch.relu(self.bn(self.dw(x)))
        x = torch.relu(self.c(x))
        return self.fc(torch.flatten(x, 1))


class EinsumOnMaps(nn.Module):
    """A 1 x 1 conv written as einsum, its parameter stored (out, in), between two BatchNormed convs."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.w = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Parameter(torch.randn(5, 8))
        self.c2, self.fc = nn.Conv2d(5, 4, 1), nn.Linear(4, 10)

    def forward(self, x):
        y = torch.einsum("nchw,dc->ndhw", F.relu(self.bn(self.c(x))), self.w)
        return self.fc(self.c2(F.relu(y)).mean((2, 3)))


METHODS = ["activation", "weight", "weight-matching"]


def random_data(shape: tuple[int, int, int], n: int = 64, classes: int = 10) -> ImageData:
    """Random uint8 images of `shape` with random labels, as an ImageData (train, val and test overlapping)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    c = shape[0]
    return ImageData("random", [str(i) for i in range(classes)], x, y, x[:8], y[:8], x[:16], y[:16], (0.5,) * c, (0.25,) * c, False)


def assert_returns_model(model, data, method, n_images=64, **options):
    """The oracle: fusing `model` with a randomly permuted copy of itself returns `model` (the aligned average)."""
    groups = channel_groups(model, normalize(data.train_x[:1], data.norm))
    copy = permute(model, groups, random_maps(groups, seed=5))
    cfg = config(method=method, n_images=n_images, bn_batches=0, refit=False, **options)  # the oracle is on the average
    raw = fuse([model, copy], data.train_x, data.norm, cfg).fused_no_bn
    ref = model.state_dict()
    for k, v in raw.state_dict().items():
        assert torch.allclose(v.float(), ref[k].float(), atol=1e-5, rtol=0), f"{method}: {k} differs"


def assert_default_fusion_returns_model(model, data):
    """The whole default pipeline (alignment, averaging, BatchNorm, refit) on `model` and a randomly permuted copy:
    the fused model computes what `model` does on the test images."""
    groups = channel_groups(model, normalize(data.train_x[:1], data.norm))
    twin = permute(model, groups, random_maps(groups, seed=5))
    fused = fuse([model, twin], data.train_x, data.norm, config(n_images=32, refit_n_images=32)).fused
    x = normalize(data.test_x, data.norm)
    with torch.no_grad():
        a, b = model(x), fused(x)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def bench_module(name: str):
    """A script of bench/ imported as a module (registered, so its dataclasses resolve their annotations), with
    bench/ on the import path as when it runs (its shared `harness`)."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def config(**flat) -> FuseConfig:
    """A FuseConfig from flat option names, as on the command line: config(method="weight", refit=False).
    In fp32 unless `precision` is given: exactness properties are properties of exact arithmetic."""
    return build(FuseConfig, {"precision": "fp32", **flat})


# --- channel splits, slices, gates, norm groups, parametrised and tied weights: patterns users write ---------------


class _Head(nn.Module):
    def head(self, x):
        return self.fc(torch.relu(x).mean((2, 3)))


class SplitNet(_Head):
    """A BatchNorm'd map split into unequal parts, each read by its own conv."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1), nn.Linear(8, 3)

    def forward(self, x):
        p, q = torch.relu(self.bn(self.c(x))).split([3, 5], 1)
        return self.head(torch.cat([self.a(p), self.b(q)], 1))


class GLUNet(_Head):
    """A gated linear unit: the first half of the channels times the sigmoid of the second."""

    def __init__(self):
        super().__init__()
        self.c, self.d, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        a, b = self.c(x).chunk(2, 1)
        return self.head(self.d(a * torch.sigmoid(b)))


class PartialResidualNet(_Head):
    """A residual added to the first k channels only."""

    def __init__(self):
        super().__init__()
        self.c, self.s, self.d, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 3, 1), nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        y = self.c(x)
        return self.head(self.d(torch.cat([y[:, :3] + self.s(x), y[:, 3:]], 1)))


class Res2Net(_Head):
    """Res2Net's hierarchical split: part i goes through its conv after adding the previous part's output."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
        self.d, self.fc = nn.Conv2d(12, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        parts = torch.relu(self.bn(self.c(x))).chunk(3, 1)
        out, prev = [], None
        for i, conv in enumerate(self.convs):
            prev = torch.relu(conv(parts[i] if prev is None else parts[i] + prev))
            out.append(prev)
        return self.head(self.d(torch.cat(out + [parts[2]], 1)))


class GhostNet(_Head):
    """A Ghost module: a conv, cheap depthwise 'ghost' features of it, concatenated, then cut to the output width."""

    def __init__(self):
        super().__init__()
        self.primary, self.cheap = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.d, self.fc = nn.Conv2d(6, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.primary(x))
        return self.head(self.d(torch.cat([y, torch.relu(self.cheap(y))], 1)[:, :6]))


class MixConvNet(_Head):
    """Mixed kernels: the channels split, each part through a depthwise conv of its own kernel size."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.k3, self.k5 = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.bn, self.d, self.fc = nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        a, b = torch.relu(self.c(x)).split(4, 1)
        return self.head(self.d(torch.relu(self.bn(torch.cat([self.k3(a), self.k5(b)], 1)))))


class GroupNormNet(_Head):
    def __init__(self):
        super().__init__()
        self.a, self.n, self.d, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.d(torch.relu(self.n(self.a(x)))))


class WeightNormNet(_Head):
    """Convs under torch.nn.utils.parametrizations.weight_norm (the stored tensors are g and v)."""

    def __init__(self):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.c, self.d, self.fc = wn(nn.Conv2d(3, 8, 3, padding=1)), wn(nn.Conv2d(8, 6, 1)), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.d(torch.relu(self.c(x))))


class SpectralNormNet(_Head):
    """A conv under spectral_norm, whose power-iteration vectors u and v are per-channel buffers."""

    def __init__(self):
        super().__init__()
        self.c = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 8, 3, padding=1))
        self.d, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.d(torch.relu(self.c(x))))


class TiedNet(_Head):
    """One conv called twice (tied weights)."""

    def __init__(self):
        super().__init__()
        self.c, self.t, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.c(x))
        return self.head(self.t(torch.relu(self.t(y)) + y))


class PixelShuffleNet(_Head):
    """Sub-pixel upsampling: 16 channels become 4 at twice the resolution (channel c * 4 + k is pixel k of channel c)."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.up = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.PixelShuffle(2)
        self.d, self.fc = nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.d(self.up(torch.relu(self.bn(self.c(x))))))


class PixelUnshuffleNet(_Head):
    """Space-to-depth: 4 channels become 16 at half the resolution, then a conv and BatchNorm over all 16."""

    def __init__(self):
        super().__init__()
        self.c, self.down = nn.Conv2d(3, 4, 3, padding=1), nn.PixelUnshuffle(2)
        self.d, self.bn, self.fc = nn.Conv2d(16, 6, 1), nn.BatchNorm2d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.d(self.down(torch.relu(self.c(x)))))))


class SelectiveKernelNet(_Head):
    """Selective kernel (SKNet): two paths stacked on a new dim, attention over the paths viewed as (paths, channels)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.paths = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=d, dilation=d), nn.BatchNorm2d(8)) for d in (1, 2))
        self.reduce, self.bn, self.select = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.c(x))
        paths = torch.stack([torch.relu(p(x)) for p in self.paths], 1)
        attn = self.select(torch.relu(self.bn(self.reduce(paths.sum(1).mean((2, 3), keepdim=True)))))
        return self.head((paths * attn.view(len(x), 2, 8, 1, 1).softmax(1)).sum(1))


class SplitAttentionNet(_Head):
    """Split attention (ResNeSt): a grouped conv's outputs viewed as (radix, channels), a radix softmax through
    view, transpose and reshape, then summed over the radix."""

    def __init__(self):
        super().__init__()
        self.c, self.conv, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16)
        self.fc1, self.bn1, self.fc2 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 16, 1)
        self.d, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        n = len(x)
        x = torch.relu(self.bn0(self.conv(torch.relu(self.c(x))))).reshape(n, 2, 8, *x.shape[2:])
        a = self.fc2(torch.relu(self.bn1(self.fc1(x.sum(1).mean((2, 3), keepdim=True)))))
        a = a.view(n, 1, 2, -1).transpose(1, 2).softmax(1).reshape(n, -1).view(n, -1, 1, 1).reshape(n, 2, 8, 1, 1)
        return self.head(self.d((x * a).sum(1)))


PATTERNS = {
    "split": SplitNet,
    "glu": GLUNet,
    "partial-residual": PartialResidualNet,
    "res2net": Res2Net,
    "ghost": GhostNet,
    "mixconv": MixConvNet,
    "groupnorm": GroupNormNet,
    "weight-norm": WeightNormNet,
    "spectral-norm": SpectralNormNet,
    "tied": TiedNet,
    "pixel-shuffle": PixelShuffleNet,
    "pixel-unshuffle": PixelUnshuffleNet,
    "selective-kernel": SelectiveKernelNet,
    "split-attention": SplitAttentionNet,
}


# --- small instances of torchvision's classes: the same code paths as the full-size models (bench_zoo.py covers those) ---


def small_resnet50():
    """torchvision's ResNet with Bottleneck blocks, one per stage, narrow."""
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)


def small_densenet():
    """torchvision's DenseNet: dense blocks of concatenations and transitions, narrow."""
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, bn_size=2, num_classes=10)


def small_vgg_bn():
    """torchvision's VGG with BatchNorm: its flatten after a 7x7 adaptive pool into Linear layers, narrow."""
    from torchvision.models.vgg import VGG, make_layers

    vgg = VGG(make_layers([8, "M", 16, "M", 32, 32, "M"], batch_norm=True), num_classes=10, init_weights=False)
    vgg.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    return vgg


def small_mobilenet_v2():
    """torchvision's MobileNetV2 (inverted residuals, depthwise convs) at half width (at a quarter, the weight method
    cannot tell the 8 stem channels apart: an ambiguity of that method, not of the grouping)."""
    from torchvision.models import mobilenet_v2

    return mobilenet_v2(num_classes=10, width_mult=0.5)
