"""The distillation stage: its target is the refit classifier's (weighted logits, per-class counts, mean
probabilities), it brings the fused model nearer that target on images it did not train on, it leaves the parents as
they were, it is off by default, and a bad value is one line."""

from __future__ import annotations

import copy

import pytest
import torch

from otfuse.cli import main
from otfuse.distill import DistillConfig, distill, passes, steps_of, target_probs
from otfuse.evaluate import logits
from otfuse.fusion import FuseConfig, fuse
from otfuse.precision import Precision

from support import config


def test_the_target_is_the_weighted_logits_or_the_weighted_mean_probabilities():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 4, generator=g) * s for s in (1.0, 5.0)]
    even = torch.tensor([0.5, 0.5])
    assert torch.allclose(target_probs(z, even, 1.0, probs=False), ((z[0] + z[1]) / 2).softmax(1))
    assert torch.allclose(target_probs(z, even, 1.0, probs=True), (z[0].softmax(1) + z[1].softmax(1)) / 2)
    assert torch.allclose(target_probs(z, even, 2.0, probs=False), ((z[0] + z[1]) / 4).softmax(1))
    # per class: classes 0-1 from the first teacher, 2-3 from the second (what --head counts gives disjoint parties)
    owner = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(target_probs(z, owner, 1.0, probs=False), torch.cat([z[0][:, :2], z[1][:, 2:]], 1).softmax(1))
    p = target_probs(z, owner, 1.0, probs=True)
    want = torch.cat([z[0].softmax(1)[:, :2], z[1].softmax(1)[:, 2:]], 1)
    assert torch.allclose(p, want / want.sum(1, keepdim=True)) and torch.allclose(p.sum(1), torch.ones(6))


def test_distillation_brings_the_fusion_nearer_its_parents_target_on_held_out_images(trained):
    """Trained on the training images only, the fused model's cross-entropy to the parents' target falls on the
    validation images; the parents are left as they were, and the fused model is returned in eval mode."""
    models, data, _, _ = trained
    before = [copy.deepcopy(m.state_dict()) for m in models]
    plain = fuse(models, data.train_x, data.norm, config(bn_batches=4, n_images=300, refit_n_images=300))  # same data: none
    cfg = config(bn_batches=4, n_images=300, refit_n_images=300, distill_epochs=3, distill_batch_size=64)
    distilled = fuse(models, data.train_x, data.norm, cfg)
    assert "distill" in distilled.seconds and "distill" not in plain.seconds
    assert not distilled.fused.training
    x, y = data.split("val")
    z = [logits(m, x, data.norm, Precision.FP32) for m in models]
    target = target_probs(z, torch.tensor([0.5, 0.5]), 1.0, probs=False)
    ce = lambda m: torch.nn.functional.cross_entropy(logits(m, x, data.norm, Precision.FP32), target).item()
    assert ce(distilled.fused) < ce(plain.fused)
    acc = lambda m: (logits(m, x, data.norm, Precision.FP32).argmax(1) == y).float().mean().item()
    assert acc(distilled.fused) >= acc(plain.fused) - 0.02
    for m, sd in zip(models, before):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


def test_by_default_parents_of_different_data_are_distilled_for_one_pass_and_others_not():
    auto = FuseConfig().distill
    assert passes(auto, torch.tensor([[5, 5, 0], [0, 5, 5]])) == 1.0  # parties of different data
    assert passes(auto, torch.tensor([[5, 5, 5], [5, 5, 5], [5, 5, 5]])) == 0.0  # the same data
    assert passes(auto, None) == 0.0 and passes(auto, torch.tensor([[5, 5, 0]])) == 0.0  # unknown; one model
    assert passes(DistillConfig(epochs=0), torch.tensor([[5, 0], [0, 5]])) == 0.0
    assert passes(DistillConfig(epochs=2.5), None) == 2.5


def test_the_passes_count_whole_batches():
    assert steps_of(0, 256, 1000) == 0
    assert steps_of(1, 256, 1000) == 3  # the last, partial batch is dropped
    assert steps_of(0.01, 256, 1000) == 1
    assert steps_of(2.5, 100, 1000) == 25


def test_fewer_images_than_a_batch_make_one_batch_and_one_image_is_one_clear_error(trained):
    from otfuse.errors import OtfuseError

    models, data, _, _ = trained
    fused = copy.deepcopy(models[0])
    distill(fused, models, [0.5, 0.5], data.train_x[:100], data.norm, DistillConfig(epochs=1), Precision.FP32)
    assert not torch.equal(fused.fc.weight, models[0].fc.weight) and not fused.training
    with pytest.raises(OtfuseError, match="--distill-epochs 1 trains on batches of two images or more, but the fusion reads 1"):
        distill(fused, models, [0.5, 0.5], data.train_x[:1], data.norm, DistillConfig(epochs=1), Precision.FP32)


@pytest.mark.parametrize(("flag", "value"), [("--distill-epochs", "-2"), ("--distill-lr", "0"), ("--distill-batch-size", "1")])
def test_a_bad_distillation_option_is_one_clear_error(capsys, tmp_path, flag, value):
    assert main(["fuse", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
