"""A smoke test of the zoo (bench/bench_zoo.py's check, on a dozen small models across the families the project
claims exact): a torch, timm or Torch-Pruning upgrade that turns one of them into a refused or wrong one fails
here, not a user. The full zoo (hundreds of models, minutes to hours) stays a bench."""

from __future__ import annotations

import pytest

from support import bench_module

pytest.importorskip("timm")

# (source, model, image side): small images where the model takes any (its grouping and maps do not depend on it)
ZOO = [
    ("torchvision", "resnet18", 32),
    ("torchvision", "resnext50_32x4d", 32),
    ("torchvision", "convnext_tiny", 32),
    ("torchvision", "efficientnet_b0", 32),
    ("torchvision", "regnet_y_400mf", 32),
    ("torchvision", "densenet121", 32),
    ("timm-transformers", "vit_tiny_patch16_224", None),  # a position table fixes the side
    ("timm-transformers", "pvt_v2_b0", None),  # hierarchical, spatial-reduction attention
    ("timm", "poolformer_s12", 64),  # a MetaFormer
    ("timm", "mobilevit_xxs", 64),  # convolutions and attention mixed
    ("timm", "mobilevitv2_050", 64),  # separable self-attention: one context-score channel broadcast over the keys
    ("timm", "gcresnext26ts", 64),  # global-context blocks: every channel pooled by one softmaxed attention channel
    ("timm-mlp", "mixer_s32_224", None),  # token mixing
]


@pytest.mark.parametrize("source,name,size", ZOO, ids=[m for _, m, _ in ZOO])
def test_a_zoo_model_permutes_exactly(source, name, size):
    row = bench_module("bench_zoo").check(source, name, size, limit=120.0)
    assert row["result"] == "exact", row


def test_the_registry_vit_permutes_exactly():
    """The project's own ViT (`--arch vit`), through the same check as the zoo's."""
    import torch

    from otfuse import channel_groups, permute, random_maps
    from otfuse.models import build_model

    from support import randomize_bn, randomize_constants

    torch.manual_seed(0)
    model = randomize_bn(randomize_constants(build_model("vit", 16, 3, 10, 32))).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    groups = channel_groups(model, x[:1])
    out = permute(model, groups, random_maps(groups, seed=3))
    with torch.no_grad():
        a, b = model(x), out(x)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
