"""Neuron transplantation: models side by side in a wider model compute exactly their ensemble, magnitude
pruning back keeps the stronger model's channels, and an architecture that does not widen is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from otfuse.bn import BatchNormConfig
from otfuse.errors import OtfuseError
from otfuse.evaluate import logits
from otfuse.models import build_model
from otfuse.precision import Precision
from otfuse.transplant import pruned, side_by_side, transplant

from support import randomize_bn

NORM = ((0.5,) * 3, (0.25,) * 3)


def _images(n: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _model(width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(build_model("resnet18", width, 3, 10), seed)


@pytest.mark.parametrize("n", [2, 3])
def test_models_side_by_side_compute_their_ensemble(n):
    models, x = [_model(4, seed) for seed in range(n)], _images()
    wide = side_by_side(models, build_model("resnet18", 4 * n, 3, 10), x, NORM)
    want = sum(logits(m, x, NORM, Precision.FP32) for m in models) / n
    assert torch.allclose(logits(wide, x, NORM, Precision.FP32), want, atol=1e-5)


def test_pruning_back_keeps_the_stronger_models_channels():
    a = _model(4, 0)
    weak = copy.deepcopy(a)
    with torch.no_grad():
        for name, p in weak.named_parameters():
            if not name.startswith("fc") and not name.startswith("linear"):
                p.mul_(1e-3)
    x = _images()
    head = [name for name, m in a.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    start = pruned(side_by_side([a, weak], build_model("resnet18", 8, 3, 10), x, NORM), build_model("resnet18", 4, 3, 10), 0.5, x, NORM)
    got, want = start.state_dict(), a.state_dict()
    for key in want:
        if key == f"{head}.weight":
            assert torch.equal(got[key], want[key] / 2), key  # the classifier averages the two blocks' logits
        else:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("width,ratio", [(4, None), (2, 0.75)])
def test_transplant_returns_the_narrow_model_with_its_batchnorm_recomputed(width, ratio):
    models, x = [_model(4, 0), _model(4, 1)], _images()
    start = transplant(
        models,
        build_model("resnet18", 8, 3, 10),
        build_model("resnet18", width, 3, 10),
        x,
        NORM,
        BatchNormConfig(batches=2, batch_size=32),
        Precision.FP32,
        ratio=ratio,
    )
    want = build_model("resnet18", width, 3, 10).state_dict()
    assert not start.training and start.state_dict().keys() == want.keys()
    assert all(a.shape == b.shape for a, b in zip(start.state_dict().values(), want.values()))
    assert torch.isfinite(logits(start, x, NORM, Precision.FP32)).all()


def test_a_model_that_does_not_widen_is_refused():
    models, x = [_model(4, 0), _model(4, 1)], _images()
    with pytest.raises(OtfuseError, match="cannot be widened into its models side by side"):
        side_by_side(models, build_model("resnet18", 4, 3, 10), x, NORM)
