"""Architectures by name. `build_model("resnet18", width=64, in_channels=3, num_classes=10, image_size=32)`.

The CIFAR-style ResNet18 has a 3x3 stride-1 stem and no max-pool, BasicBlocks [2, 2, 2, 2]
with widths (w, 2w, 4w, 8w). `resnext18` has the same layout with ResNeXt bottlenecks whose
3x3 convs are grouped (4 groups). `vit` is a small vision transformer: `width` is its embedding
width, 6 pre-norm blocks, one head per 16 channels, a class token, learned position embeddings,
and patches of the smallest size that divides the image side into at most 8 (28 px: 4, 32 px: 4).
Register another architecture with `@register("name")` on a function taking (width, in_channels,
num_classes, image_size); CNNs ignore the image size.

`timm:<name>` builds any model of timm (`pip install -e .[timm]`) with random weights (nothing is
downloaded); timm models have no width knob, so their width is recorded as 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from otfuse.errors import OtfuseError

REGISTRY: dict[str, Callable[[int, int, int, int], nn.Module]] = {}


def register(name: str):
    """Add an architecture: `@register("name")` on a function (width, in_channels, num_classes, image_size) -> nn.Module."""

    def wrap(fn: Callable[[int, int, int, int], nn.Module]) -> Callable[[int, int, int, int], nn.Module]:
        REGISTRY[name] = fn
        return fn

    return wrap


TIMM = "timm:"
MAX_WIDTH = 512  # base channels: parameters grow with its square (a ResNet18 of width 512 has 0.7 billion, 2.8 GB)


def check_arch(arch: str) -> None:
    """One clear error for an architecture name the registry does not hold (timm names are checked when built)."""
    if not arch.startswith(TIMM) and arch not in REGISTRY:
        raise OtfuseError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(REGISTRY))}")


def build_model(arch: str, width: int = 64, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    if arch.startswith(TIMM):
        return timm_model(arch[len(TIMM) :], width, in_channels, num_classes)
    check_arch(arch)
    if width < 1 or in_channels < 1 or num_classes < 2 or image_size < 1:
        raise OtfuseError(
            f"width {width}, in_channels {in_channels}, num_classes {num_classes}, image_size {image_size}: "
            "need width>=1, in_channels>=1, num_classes>=2, image_size>=1"
        )
    return REGISTRY[arch](width, in_channels, num_classes, image_size)


def model_from_meta(meta: dict, width: int | None = None) -> nn.Module:
    """A fresh model of the architecture checkpoint metadata `meta` names (at `width`, default its own, with the
    layer widths its `shapes` record: a budgeted fusion's); checkpoints written before the image size was recorded
    hold 32 px CNNs, which ignore it."""
    model = build_model(
        meta["arch"], meta["width"] if width is None else width, meta["in_channels"], meta["num_classes"], int(meta.get("image_size", 32))
    )
    return resized(model, meta["shapes"]) if meta.get("shapes") and width is None else model


RESIZABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)


def resized(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """`model` with the tensors named in `shapes` (state-dict key -> shape) replaced by uninitialised ones of those
    shapes and each layer's size attributes following its weight: the architecture of a model whose layers are
    not all of its base width (a budgeted fusion keeps some groups wider). Returns `model`."""
    layers = dict(model.named_modules())
    touched = {}
    for key, shape in shapes.items():
        owner, _, name = key.rpartition(".")
        layer = layers.get(owner)
        old = layer.state_dict(keep_vars=True).get(name) if layer is not None else None
        if not isinstance(layer, RESIZABLE) or old is None or len(shape) != old.ndim:
            raise OtfuseError(f"recorded shape of {key}: no resizable layer holds a {len(shape)}-dim tensor there; re-create the file")
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(layer, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            layer.register_buffer(name, new)
        touched[owner] = layer
    for layer in touched.values():
        _follow_weight(layer)
    return model


def _follow_weight(layer: nn.Module) -> None:
    """A layer's size attributes set from its (resized) tensors; a depthwise conv stays depthwise."""
    if isinstance(layer, nn.Conv2d):
        depthwise = layer.groups == layer.in_channels == layer.out_channels and layer.groups > 1
        layer.out_channels = layer.weight.shape[0]
        layer.groups = layer.out_channels if depthwise else layer.groups
        layer.in_channels = layer.weight.shape[1] * layer.groups
    elif isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = layer.weight.shape
    elif isinstance(layer, nn.BatchNorm2d | nn.BatchNorm1d):
        layer.num_features = layer.running_mean.shape[0] if layer.running_mean is not None else layer.weight.shape[0]
    elif isinstance(layer, nn.LayerNorm):
        layer.normalized_shape = tuple(layer.weight.shape)
    elif isinstance(layer, nn.GroupNorm):
        layer.num_channels = layer.weight.shape[0]


def shapes_beyond(model: nn.Module, base: nn.Module) -> dict[str, list[int]]:
    """The tensors of `model` whose shapes differ from `base`'s (the same architecture at its base width), by key:
    what a checkpoint records so `model_from_meta` builds `model`'s architecture again."""
    own = base.state_dict()
    return {k: list(t.shape) for k, t in model.state_dict().items() if k in own and own[k].shape != t.shape}


def timm_model(name: str, width: int, in_channels: int, num_classes: int) -> nn.Module:
    """timm's model `name` with random weights; `width` must be 0 (timm models have no width knob)."""
    try:
        import timm  # optional extra: only timm architectures need it
    except ImportError:
        raise OtfuseError(f"--arch {TIMM}{name} needs timm; install it with pip install -e .[timm]") from None
    if width:
        raise OtfuseError(f"--width {width}: timm models have no width knob; leave --width out for --arch {TIMM}{name}")
    if name not in timm.list_models():
        raise OtfuseError(f"--arch {TIMM}{name}: timm has no model {name!r}; see timm.list_models()")
    if num_classes < 2 or in_channels < 1:
        raise OtfuseError(f"in_channels {in_channels}, num_classes {num_classes}: need in_channels>=1, num_classes>=2")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def arch_width(arch: str, width: int) -> int:
    """The width a run of `arch` records: timm models have none (0)."""
    return 0 if arch.startswith(TIMM) else width


def arch_folder(arch: str, width: int) -> str:
    """The checkpoint folder of an architecture and width: `resnet18-w16`, `timm-mixnet_s-w0`."""
    return f"{arch.replace(':', '-')}-w{arch_width(arch, width)}"


def shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    """A residual block's shortcut: the identity, or a strided 1x1 conv with BatchNorm where the shape changes."""
    if stride != 1 or cin != cout:
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return nn.Sequential()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class GroupedBlock(nn.Module):
    """A ResNeXt bottleneck at full width: 1x1, a grouped 3x3 (`cardinality` groups), 1x1, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, cardinality: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], width: int, in_channels: int, num_classes: int, block: type = BasicBlock):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stage = [block(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            layers.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register("resnet18")
def resnet18(width: int, in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    return ResNet([2, 2, 2, 2], width, in_channels, num_classes)


@register("resnext18")
def resnext18(width: int, in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    """ResNet18's layout with ResNeXt bottlenecks: grouped 3x3 convs of 4 groups (width a multiple of 4)."""
    if width % 4:
        raise OtfuseError(f"--width {width}: resnext18 splits every stage into 4 groups; use a multiple of 4")
    return ResNet([2, 2, 2, 2], width, in_channels, num_classes, GroupedBlock)


class SelfAttention(nn.Module):
    """Multi-head self-attention with q, k and v from one Linear: the layout `otfuse.grouping.attention` recognises."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, width: int, in_channels: int, num_classes: int, image_size: int, patch: int, depth: int, num_heads: int):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(width, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def patch_size(image_size: int, grid: int = 8) -> int:
    """The smallest patch side that divides `image_size` into at most `grid` patches per side."""
    return next(p for p in range(1, image_size + 1) if image_size % p == 0 and image_size // p <= grid)


@register("vit")
def vit(width: int, in_channels: int, num_classes: int, image_size: int = 32) -> nn.Module:
    """A small ViT: `width` channels, 6 blocks, one head per 16 channels (at least one)."""
    heads = max(1, width // 16)
    if width % heads:
        raise OtfuseError(
            f"--width {width}: vit gives one attention head per 16 channels ({heads} heads), which must divide "
            "the width; use a multiple of 16"
        )
    return ViT(width, in_channels, num_classes, image_size, patch_size(image_size), depth=6, num_heads=heads)
