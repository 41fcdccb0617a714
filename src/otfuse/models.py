"""Architectures by name. `build_model("resnet18", width=64, in_channels=3, num_classes=10)`.

The CIFAR-style ResNet18 has a 3x3 stride-1 stem and no max-pool, BasicBlocks [2, 2, 2, 2]
with widths (w, 2w, 4w, 8w). Register another architecture with `@register("name")` on a
function taking (width, in_channels, num_classes).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from otfuse.errors import OtfuseError

REGISTRY: dict[str, Callable[[int, int, int], nn.Module]] = {}


def register(name: str):
    def wrap(fn):
        REGISTRY[name] = fn
        return fn

    return wrap


def build_model(arch: str, width: int = 64, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    if arch not in REGISTRY:
        raise OtfuseError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(REGISTRY))}")
    if width < 1 or in_channels < 1 or num_classes < 2:
        raise OtfuseError(f"width {width}, in_channels {in_channels}, num_classes {num_classes}: need width>=1, in_channels>=1, num_classes>=2")
    return REGISTRY[arch](width, in_channels, num_classes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks: list[int], width: int, in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            stage = [BasicBlock(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
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
def resnet18(width: int, in_channels: int, num_classes: int) -> nn.Module:
    return ResNet([2, 2, 2, 2], width, in_channels, num_classes)


def model_meta(model_cfg: dict) -> dict:
    """The metadata keys that decide whether two checkpoints share an architecture."""
    return {k: model_cfg[k] for k in ("arch", "width", "in_channels", "num_classes")}


def save_checkpoint(path, model: nn.Module, meta: dict, **extra) -> None:
    """A checkpoint that loads with weights_only=True: state dict, metadata, optional training state."""
    from otfuse import __version__
    from otfuse.storage import save_torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch(path, {"state_dict": state, "meta": {**meta, "version": __version__}, **extra})


def load_checkpoint(path) -> tuple[nn.Module, dict, dict]:
    """(model, meta, the whole checkpoint dict), or one clear error for a file that is not ours."""
    from otfuse.storage import load_torch

    ckpt = load_torch(path)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in ckpt or any(k not in meta for k in ("arch", "width", "in_channels", "num_classes")):
        raise OtfuseError(f"checkpoint {path} is not an otfuse checkpoint (no metadata); give one written by otfuse train or fuse")
    model = build_model(meta["arch"], meta["width"], meta["in_channels"], meta["num_classes"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise OtfuseError(f"checkpoint {path} does not match its own metadata ({str(exc).splitlines()[0][:120]})") from None
    return model, meta, ckpt
