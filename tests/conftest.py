"""Shared fixtures: small models with randomised BatchNorm statistics, tiny datasets on disk."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from otfuse.checkpoints import load_checkpoint
from otfuse.data import load_dataset
from otfuse.fuse import FuseConfig
from otfuse.options import build
from otfuse.train import TrainConfig, train

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


def config(**flat) -> FuseConfig:
    """A FuseConfig from flat option names, as on the command line: config(method="weight", refit=False).
    In fp32 unless `precision` is given: exactness properties are properties of exact arithmetic."""
    return build(FuseConfig, {"precision": "fp32", **flat})


@pytest.fixture
def tmp_data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Two digits ResNet18s (width 8), trained for a few epochs, and their data."""
    root = tmp_path_factory.mktemp("trained")
    # fp32: the same parents on every machine, whether or not its CPU has native bf16 (which `auto` would pick)
    cfgs = [TrainConfig(dataset="digits", width=8, epochs=8, batch_size=64, lr=0.1, seed=s, device="cpu", precision="fp32",
                        data_dir=str(root / "data"), checkpoint_dir=str(root / "ck")) for s in (0, 1)]
    paths = [train(c, progress=False) for c in cfgs]
    return [load_checkpoint(p)[0] for p in paths], load_dataset("digits", root / "data"), paths, root
