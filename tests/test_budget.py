"""Budgeted fusion (otfuse.budget): the parents side by side, zipped group by group; nothing unmerged is the full
merge, everything unmerged is the ensemble."""

from __future__ import annotations

import torch

from otfuse.budget import budgeted
from otfuse.data import normalize
from otfuse.fusion import FuseConfig, average
from otfuse.models import build_model
from otfuse.refit import RefitConfig
from otfuse.transplant import side_by_side

from support import random_data, randomize_bn

NO_REFIT = FuseConfig(refit=RefitConfig(enabled=False), precision="fp32")


def _parents() -> tuple[list[torch.nn.Module], object]:
    data = random_data((3, 16, 16))
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(randomize_bn(build_model("resnet18", 4, 3, 10, 16), seed=seed).eval())
    return models, data


def _wide(models, data) -> torch.nn.Module:
    torch.manual_seed(2)
    return side_by_side(models, build_model("resnet18", 8, 3, 10, 16), data.train_x, data.norm)


def test_nothing_unmerged_is_the_full_merge():
    """Every group zipped into one channel per pair: the weighted average of the parents, tensor by tensor, before
    BatchNorm is recomputed (the parents here stand for parents already aligned)."""
    models, data = _parents()
    fusion = budgeted(_wide(models, data), 2, {}, data.train_x, data.norm, NO_REFIT)
    want = average(models, [0.5, 0.5]).state_dict()
    got = fusion.fused_no_bn.state_dict()
    assert got.keys() == want.keys()
    for key, t in want.items():
        if t.is_floating_point():
            torch.testing.assert_close(got[key], t, rtol=1e-5, atol=1e-6, msg=key)


def test_everything_unmerged_computes_the_ensemble():
    """Every channel kept one per parent: a model as wide as the two side by side, computing the mean of their logits."""
    models, data = _parents()
    wide = _wide(models, data)
    from otfuse.grouping.exact import channel_groups
    from otfuse.grouping.group import example_input

    groups = channel_groups(wide, example_input(data.train_x, data.norm, wide))
    everything = {g.name: set(range(g.size // 2)) for g in groups}
    fused = budgeted(wide, 2, everything, data.train_x, data.norm, NO_REFIT).fused_no_bn.eval()
    x = normalize(data.test_x, data.norm)
    with torch.no_grad():
        want = sum(m(x) for m in models) / 2
        torch.testing.assert_close(fused(x), want, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in wide.parameters())


def test_a_budget_keeps_the_least_alike_channels_apart_within_its_flops():
    """Budget 1: nothing kept apart. Budget 1.3: some channels kept apart, the fused model within 1.3 times one
    parent's multiply-accumulates (Torch-Pruning's count of the model built)."""
    from otfuse.budget import unmerged_for_budget
    from otfuse.grouping.adapter import flops
    from otfuse.grouping.group import example_input

    models, data = _parents()
    wide = _wide(models, data)
    assert unmerged_for_budget(wide, 2, 1.0, data.train_x, data.norm) == {}
    unmerged = unmerged_for_budget(wide, 2, 1.3, data.train_x, data.norm)
    assert sum(map(len, unmerged.values())) > 0
    fused = budgeted(wide, 2, unmerged, data.train_x, data.norm, NO_REFIT).fused_no_bn
    x = example_input(data.train_x, data.norm, wide)
    assert flops(models[0], x) < flops(fused, x) <= 1.3 * flops(models[0], x)


def test_a_budget_of_k_squared_is_the_ensemble_and_of_one_the_full_merge():
    """The whole pipeline (`fuse_within_budget`: align, side by side, zip): at K * K times one parent's FLOPs (what a
    dense layer K times as wide on both sides costs) every channel stays apart and the model computes the mean of the K parents'
    logits; at 1 it is the full merge, the aligned average."""
    from otfuse.budget import fuse_within_budget, macs_ratio
    from otfuse.fusion import fuse

    models, data = _parents()
    torch.manual_seed(2)
    models.append(randomize_bn(build_model("resnet18", 4, 3, 10, 16), seed=2).eval())
    wide = lambda: build_model("resnet18", 12, 3, 10, 16)
    x = normalize(data.test_x, data.norm)
    ensemble = fuse_within_budget(models, wide(), 9.0, data.train_x, data.norm, NO_REFIT)
    assert {k: t.shape for k, t in ensemble.fused.state_dict().items()} == {k: t.shape for k, t in wide().state_dict().items()}
    assert 3.0 < macs_ratio(ensemble.fused, models[0], data.train_x, data.norm) <= 9.0  # the stem and head scale by K only
    with torch.no_grad():
        torch.testing.assert_close(ensemble.fused_no_bn.eval()(x), sum(m(x) for m in models) / 3, rtol=1e-4, atol=1e-4)
    merge = fuse_within_budget(models, wide(), 1.0, data.train_x, data.norm, NO_REFIT).fused_no_bn.state_dict()
    want = fuse(models, data.train_x, data.norm, NO_REFIT).fused_no_bn.state_dict()
    assert merge.keys() == want.keys()
    for key, t in want.items():
        if t.is_floating_point():
            torch.testing.assert_close(merge[key], t, rtol=1e-4, atol=1e-5, msg=key)


def test_a_budget_distils_from_the_parties_where_their_class_counts_differ(trained):
    """The budgeted model's last stage is the distillation from the K parents themselves (not from the wide model):
    with differing class counts one pass by default; passes bring it nearer the parents' per-class target on held-out
    images (three passes here, where one is within noise); with equal counts none, as for the full merge."""
    from otfuse.budget import fuse_within_budget
    from otfuse.checkpoints import load_checkpoint
    from otfuse.distill import target_probs
    from otfuse.evaluate import logits
    from otfuse.fusion import head_weights
    from otfuse.models import model_from_meta
    from otfuse.precision import Precision

    from support import config

    models, data, paths, _ = trained
    _, meta, _ = load_checkpoint(paths[0])
    skewed = torch.tensor([[90] * 5 + [10] * 5, [10] * 5 + [90] * 5])
    opts = {"bn_batches": 4, "n_images": 300, "refit_n_images": 300, "distill_batch_size": 64, "head": "counts"}

    def fusion(counts, **more):
        wide = model_from_meta(meta, 2 * meta["width"])
        return fuse_within_budget(models, wide, 1.25, data.train_x, data.norm, config(**opts, **more), class_counts=counts)

    assert "distill" in fusion(skewed).seconds and "distill" not in fusion(torch.full((2, 10), 50)).seconds
    plain, distilled = fusion(skewed, distill_epochs=0), fusion(skewed, distill_epochs=3)
    x, _ = data.split("val")
    head = head_weights(config(**opts), skewed, distilled.weights)
    target = target_probs([logits(m, x, data.norm, Precision.FP32) for m in models], head, 1.0, probs=False)
    ce = lambda m: torch.nn.functional.cross_entropy(logits(m, x, data.norm, Precision.FP32), target).item()
    assert ce(distilled.fused) < ce(plain.fused)
