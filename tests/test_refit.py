"""The layer-wise refit: a permuted copy gives the model back, it brings a fusion nearer its parents'
mean, and it handles layers with and without BatchNorm or bias, and layers it cannot refit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from otfuse import channel_groups, permute, random_maps
from otfuse.cli import main
from otfuse.data import ImageData, normalize
from otfuse.evaluate import logits
from otfuse.fusion import fuse
from otfuse.precision import Precision
from otfuse.refit import units

from support import CatNet, config, randomize_bn


def _images(shape=(3, 8, 8), n=96) -> ImageData:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return ImageData("random", [str(i) for i in range(5)], x, y, x[:16], y[:16], x[:32], y[:32], (0.5,) * 3, (0.25,) * 3, False)


def _permuted_copy(model, data):
    groups = channel_groups(model, normalize(data.train_x[:1], data.norm))
    return permute(model, groups, random_maps(groups, seed=3))


def test_refit_gives_back_a_trained_model_fused_with_its_permuted_copy(trained):
    models, data, _, _ = trained
    model = models[0]
    fused = fuse(
        [model, _permuted_copy(model, data)], data.train_x, data.norm, config(bn_batches=4, n_images=500, refit_n_images=500)
    ).fused
    x, _ = data.split("test")
    z, z_ref = logits(fused, x, data.norm, Precision.FP32), logits(model, x, data.norm, Precision.FP32)
    assert torch.allclose(z, z_ref, atol=1e-3 * z_ref.abs().max().item(), rtol=0)
    assert torch.equal(z.argmax(1), z_ref.argmax(1))


def test_three_parents_are_read_one_forward_pass_at_a_time_and_a_perturbed_model_comes_back(trained):
    """Memory bounded in the number of parents: no parent's forward pass starts before the last one ended (their
    outputs are summed as they come); refit onto three copies of a model, a perturbed copy comes back as the model."""
    from otfuse.refit import RefitConfig, refit

    models, data, _, _ = trained
    model = models[0].eval()
    parents = [copy.deepcopy(model) for _ in range(3)]
    fused = copy.deepcopy(model)
    with torch.no_grad():
        for w in fused.parameters():
            w.add_(0.1 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())))
    in_flight, most = [0], [0]

    def started(*_):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])

    def ended(*_):
        in_flight[0] -= 1

    handles = [h for p in parents for h in (p.register_forward_pre_hook(started), p.register_forward_hook(ended))]
    refit(fused, parents, [0.5, 0.3, 0.2], data.train_x, data.norm, RefitConfig(n_images=500, batch_size=100), Precision.FP32)
    for h in handles:
        h.remove()
    assert most[0] == 1
    x, _ = data.split("test")
    z, z_ref = logits(fused, x, data.norm, Precision.FP32), logits(model, x, data.norm, Precision.FP32)
    assert torch.allclose(z, z_ref, atol=1e-3 * z_ref.abs().max().item(), rtol=0)


def test_refit_brings_the_fusion_nearer_its_parents_mean(trained):
    models, data, _, _ = trained
    result = fuse(models, data.train_x, data.norm, config(bn_batches=10, n_images=500, refit_n_images=500))
    fused, plain = result.fused, result.fused_average
    x, y = data.split("val")
    target = sum(logits(m, x, data.norm, Precision.FP32) for m in models) / 2
    err = lambda m: (logits(m, x, data.norm, Precision.FP32) - target).pow(2).mean().item()
    assert err(fused) < 0.5 * err(plain)
    acc = lambda m: (logits(m, x, data.norm, Precision.FP32).argmax(1) == y).float().mean().item()
    assert acc(fused) >= acc(plain)


def test_units_pair_layers_with_their_batchnorm_grouped_convs_included():
    found = dict(units(CatNet().eval(), torch.randn(2, 3, 8, 8)))
    assert found == {"a": "bn_a", "b": None, "dw": "bn", "c": None, "fc": None}  # dw (groups=10): block by block


class NoBias(nn.Module):
    """Convs with neither bias nor BatchNorm after them, then a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.c2(torch.relu(self.c1(x)))), 1))


@pytest.mark.parametrize("make", [lambda: randomize_bn(CatNet()), NoBias], ids=["catnet", "no-bias"])
def test_refit_gives_back_models_with_and_without_batchnorm(make):
    torch.manual_seed(0)
    model, data = make().eval(), _images()
    fused = fuse([model, _permuted_copy(model, data)], data.train_x, data.norm, config(bn_batches=0, n_images=96, refit_n_images=96)).fused
    z, z_ref = logits(fused, data.train_x, data.norm, Precision.FP32), logits(model, data.train_x, data.norm, Precision.FP32)
    assert torch.allclose(z, z_ref, atol=1e-3 * z_ref.abs().max().item(), rtol=0)


class Grouped(nn.Module):
    """A grouped conv (4 blocks) between dense ones, each with BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.n2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.n1(self.c1(x)))
        return self.fc(torch.flatten(torch.relu(self.n2(self.c2(x))), 1))


def test_refit_gives_back_a_grouped_conv_model_and_refits_its_blocks():
    torch.manual_seed(1)
    model, data = randomize_bn(Grouped()), _images()
    assert dict(units(model, torch.randn(2, 3, 8, 8)))["c2"] == "n2"
    fused = fuse([model, _permuted_copy(model, data)], data.train_x, data.norm, config(bn_batches=0, n_images=96, refit_n_images=96)).fused
    z, z_ref = logits(fused, data.train_x, data.norm, Precision.FP32), logits(model, data.train_x, data.norm, Precision.FP32)
    assert torch.allclose(z, z_ref, atol=1e-3 * z_ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("make", [NoBias, lambda: randomize_bn(Grouped())], ids=["no-bias", "grouped"])
def test_refit_fits_two_different_models_better_than_their_average(make):
    torch.manual_seed(0)
    a, b, data = make().eval(), make().eval(), _images()
    result = fuse([a, b], data.train_x, data.norm, config(bn_batches=0, n_images=96, refit_n_images=96))
    fused, raw = result.fused, result.fused_no_bn
    target = (logits(a, data.train_x, data.norm, Precision.FP32) + logits(b, data.train_x, data.norm, Precision.FP32)) / 2
    err = lambda m: (logits(m, data.train_x, data.norm, Precision.FP32) - target).pow(2).mean().item()
    assert err(fused) < 0.5 * err(raw)


def test_a_negative_ridge_is_one_clear_error(capsys, tmp_path):
    assert main(["fuse", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--refit-ridge", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--refit-ridge" in err[0]


def test_recomputing_batchnorm_before_the_refit_changes_nothing(trained, monkeypatch):
    """The refit sets every BatchNorm's statistics of a ResNet18 itself, so the pipeline skips the
    recomputation before it: the fused model is the one the full sequence gives."""
    import otfuse.fusion as F

    models, data, _, _ = trained
    cfg = config(bn_batches=4, n_images=200, refit_n_images=200)
    skipped = F.fuse(models, data.train_x, data.norm, cfg)
    assert "batchnorm" not in skipped.seconds
    monkeypatch.setattr(F, "refit_sets_every_batchnorm", lambda *a: False)
    full = F.fuse(models, data.train_x, data.norm, cfg)
    assert "batchnorm" in full.seconds
    a, b = skipped.fused.state_dict(), full.fused.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5) for k in a if a[k].is_floating_point())  # counters aside
    assert all(torch.equal(u, v) for u, v in zip(skipped.fused_average.state_dict().values(), full.fused_average.state_dict().values()))


def test_the_classifier_weighted_by_class_counts(trained):
    """--head counts: each class's logit is fit to the parents' logits weighted by their share of the class's training
    images. Equal counts give the equal fusion exactly; counts held by one parent alone give each class that parent's
    logit (up to what the fused features can express: nearer it than the equal mean is)."""
    from otfuse.fusion import head_weights

    models, data, _, _ = trained
    cfg = config(bn_batches=4, n_images=200, refit_n_images=200)
    counts = torch.tensor([[3, 0, 5, 1, 0, 0, 2, 2, 4, 7], [1, 0, 5, 0, 9, 0, 2, 6, 0, 1]])
    cfg.head = "counts"
    w = head_weights(cfg, counts, [0.5, 0.5])
    assert torch.allclose(w[:, 0], torch.tensor([0.75, 0.25])) and torch.equal(w[:, 1], torch.tensor([0.5, 0.5]))  # none seen: equal
    assert torch.allclose(w.sum(0), torch.ones(10)) and torch.equal(w[:, 4], torch.tensor([0.0, 1.0]))
    # parents of the same data keep the model weights (--weights 0.7,0.3: an interpolation stays one); unknown counts too
    assert torch.allclose(head_weights(cfg, torch.full((2, 10), 7), [0.7, 0.3]), torch.tensor([[0.7], [0.3]]).expand(2, 10))
    assert head_weights(cfg, None, [0.5, 0.5]) is None
    equal = fuse(models, data.train_x, data.norm, config(bn_batches=4, n_images=200, refit_n_images=200)).fused
    same = fuse(models, data.train_x, data.norm, cfg, class_counts=torch.full((2, 10), 7)).fused
    assert all(torch.equal(a, b) for a, b in zip(equal.state_dict().values(), same.state_dict().values()))
    owner = torch.tensor([[1] * 5 + [0] * 5, [0] * 5 + [1] * 5])
    split = fuse(models, data.train_x, data.norm, cfg, class_counts=owner).fused
    x, _ = data.split("val")
    z = [logits(m, x, data.norm, Precision.FP32) for m in models]
    want = torch.cat([z[0][:, :5], z[1][:, 5:]], 1)
    err = lambda m: (logits(m, x, data.norm, Precision.FP32) - want).pow(2).mean().item()
    assert err(split) < err(equal)


def test_weights_sizes_weigh_each_parent_by_its_training_images(trained):
    """--weights sizes: the average weighs each parent by the training images it learnt from (its class counts summed,
    as FedAvg weighs clients): the same fusion as those numbers given to --weights; unknown counts, one clear error."""
    from otfuse.errors import OtfuseError
    from otfuse.fusion import FuseConfig

    models, data, _, _ = trained
    counts = torch.tensor([[3] * 10, [1] * 10])
    # the average alone: counts that differ would add a distillation pass and (--head counts) weigh the head per class
    one = config(bn_batches=4, n_images=200, weights="sizes", head="equal", distill_epochs=0)
    sizes = fuse(models, data.train_x, data.norm, one, class_counts=counts)
    given = fuse(models, data.train_x, data.norm, config(bn_batches=4, n_images=200, weights="30,10"))
    assert sizes.weights == pytest.approx([0.75, 0.25]) and sizes.weights == given.weights
    assert all(torch.equal(a, b) for a, b in zip(sizes.fused.state_dict().values(), given.fused.state_dict().values()))
    FuseConfig(weights="sizes").check(2)  # the counts come with the parents, after the request is checked
    with pytest.raises(OtfuseError, match="--weights sizes weighs each parent by the training images"):
        fuse(models, data.train_x, data.norm, config(weights="sizes"))


def test_the_classifier_fit_to_mean_probabilities_gives_back_a_model_fused_with_its_permuted_copy(trained):
    """--head-probs: the target is the log of the parents' mean probabilities, centred per image. For one model it
    is its logits less their mean, which its own classifier less its mean row computes: the same probabilities."""
    models, data, _, _ = trained
    model = models[0]
    cfg = config(bn_batches=4, n_images=300, refit_n_images=300)
    cfg.head_probs = True
    fused = fuse([model, _permuted_copy(model, data)], data.train_x, data.norm, cfg).fused
    x, _ = data.split("test")
    p, p_ref = logits(fused, x, data.norm, Precision.FP32).softmax(1), logits(model, x, data.norm, Precision.FP32).softmax(1)
    assert torch.allclose(p, p_ref, atol=2e-3) and torch.equal(p.argmax(1), p_ref.argmax(1))
