"""Attention: heads as blocks of channel groups, found for nn.MultiheadAttention, timm's ViT and Swin and the
registry's ViT; a random permutation of every group keeps the function, and the fusion oracle holds."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from otfuse import channel_groups, permute, random_maps
from otfuse.errors import OtfuseError
from otfuse.grouping.attention import attention_layers
from otfuse.models import build_model

from support import METHODS, assert_default_fusion_returns_model, assert_returns_model, random_data


class Encoder(nn.Module):
    """Tokens through one nn.MultiheadAttention block in any of its layouts, then a residual MLP."""

    def __init__(self, batch_first: bool = True, **options):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first, **options)
        self.mlp = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
        self.fc = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x):  # x: (batch, tokens, 6)
        h = self.embed(x)
        a = self.norm(h) if self.batch_first else self.norm(h).transpose(0, 1)
        a = self.att(a, a, a, need_weights=False)[0]
        h = h + (a if self.batch_first else a.transpose(0, 1))
        h = h + self.mlp(h)
        return self.fc(h.mean(1))


def _randomised(model: nn.Module) -> nn.Module:
    """Every parameter random and away from zero (LayerNorm affines, biases, bias_k): a wrong move shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def _assert_permutations_keep_the_function(model: nn.Module, x: torch.Tensor) -> list:
    groups = channel_groups(model, x[:1])
    with torch.no_grad():
        ref = model(x)
        for seed in (1, 2):
            out = permute(model, groups, random_maps(groups, seed))(x)
            assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), f"seed {seed}"
    return groups


class CrossEncoder(Encoder):
    """Keys and values of their own widths (kdim, vdim), read from their own projections of the input."""

    def __init__(self):
        super().__init__(kdim=10, vdim=12)
        self.kv = nn.Linear(6, 22)

    def forward(self, x):
        h = self.embed(x)
        k, v = self.kv(x).split([10, 12], -1)
        h = h + self.att(self.norm(h), k, v, need_weights=False)[0]
        return self.fc((h + self.mlp(h)).mean(1))


ENCODERS = {
    "packed": lambda: Encoder(),
    "sequence-first": lambda: Encoder(batch_first=False),
    "bias-kv": lambda: Encoder(add_bias_kv=True),
}


@pytest.mark.parametrize("layout", list(ENCODERS))
def test_multihead_attention_in_every_layout_permutes_exactly(layout):
    groups = _assert_permutations_keep_the_function(_randomised(ENCODERS[layout]()), torch.randn(5, 7, 6))
    heads = [g for g in groups if g.name.startswith("att:")]
    assert len({g.family for g in heads}) == 1, "q/k and v heads move alike"
    assert sorted(g.name for g in heads) == ["att:qk", "att:v"]
    for g in heads:  # 4 heads of 4 channels: channels move within a head, heads as blocks
        assert torch.equal(g.blocks, torch.arange(16) // 4)


class CrossAttention(Encoder):
    """Keys and values from another tensor than the queries, of the same width."""

    def forward(self, x):
        h = self.embed(x)
        h = h + self.att(self.norm(h), h, h, need_weights=False)[0]
        return self.fc(h.mean(1))


@pytest.mark.parametrize("make", [CrossEncoder, CrossAttention], ids=["kdim-vdim", "same-width"])
def test_cross_attention_is_refused_in_one_line(make):
    with pytest.raises(OtfuseError, match=r"module att\b.*otfuse fuses self-attention only"):
        channel_groups(make().eval(), torch.randn(1, 7, 6))


def test_heads_move_as_whole_blocks_and_q_with_k():
    groups = channel_groups(_randomised(Encoder()), torch.randn(1, 7, 6))
    qk = next(g for g in groups if g.name == "att:qk")
    for seed in range(5):
        perm = random_maps(groups, seed)[qk.name].perm
        assert all(len(set((perm[h * 4 : (h + 1) * 4] // 4).tolist())) == 1 for h in range(4)), "a head is split"
    rows = [m for m in qk.members if m.module == "att" and m.tensor == "in_proj_weight"]
    assert len(rows) == 1 and rows[0].index.shape == (16, 2), "q and k rows in one member: one permutation for both"


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, class_token=True, reg_tokens=1
    )


def _timm_swin():
    timm = pytest.importorskip("timm")
    return timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4), num_classes=10
    )


def _timm_swinv2():
    timm = pytest.importorskip("timm")
    return timm.models.swin_transformer_v2.SwinTransformerV2(
        img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 4), num_classes=10
    )


def _vit():
    return build_model("vit", 32, 3, 10, image_size=32)


def _torchvision_vit():
    return torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


TRANSFORMERS = {
    "otfuse-vit": _vit,
    "torchvision-vit": _torchvision_vit,
    "timm-vit": _timm_vit,
    "timm-swin": _timm_swin,
    "timm-swinv2": _timm_swinv2,
}


@pytest.mark.parametrize("arch", list(TRANSFORMERS))
def test_vision_transformers_permute_exactly(arch):
    model = _randomised(TRANSFORMERS[arch]())
    groups = _assert_permutations_keep_the_function(model, torch.randn(3, 3, 32, 32))
    assert attention_layers(model), "its attention is recognised"
    assert sum(g.name.endswith(":qk") for g in groups) == len(attention_layers(model))


@pytest.mark.parametrize("method", METHODS)
def test_the_oracle_holds_for_the_vit_with_every_method(method):
    assert_returns_model(_randomised(_vit()), random_data((3, 32, 32)), method, n_images=32)


@pytest.mark.parametrize("point", ["pre", "post"])
def test_q_and_k_are_read_after_their_projection_at_every_observation_point(point):
    assert_returns_model(_randomised(_vit()), random_data((3, 32, 32)), "activation", n_images=32, point=point)


@pytest.mark.parametrize("arch", ["otfuse-vit", "torchvision-vit"])
def test_the_default_fusion_with_refit_returns_the_model(arch):
    """The whole default pipeline (alignment, averaging, refit of every Linear that runs as a module) on a model and
    a permuted copy: the model comes back, whether its attention is timm-style or nn.MultiheadAttention."""
    assert_default_fusion_returns_model(_randomised(TRANSFORMERS[arch]()), random_data((3, 32, 32)))


def test_the_oracle_holds_for_timm_swin():
    assert_returns_model(_randomised(_timm_swin()), random_data((3, 32, 32)), "activation", n_images=32)


def test_normalised_queries_and_keys_are_refused_in_one_line():
    timm = pytest.importorskip("timm")
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10, qk_norm=True
    )
    with pytest.raises(OtfuseError, match=r"blocks\.0\.attn.*norm"):
        channel_groups(model.eval(), torch.randn(1, 3, 32, 32))


@pytest.mark.slow
def test_the_vit_trains_and_goes_through_the_scripts_tune_and_interpolate(tmp_path, capsys):
    """`--arch vit` end to end, unchanged commands: two seeds, the fusion script (with one fine-tuning epoch),
    tune and interpolate."""
    from otfuse.cli import main
    from otfuse.results import read_rows
    from otfuse.sweep import main as sweep_main
    from otfuse.train import TrainConfig, train

    cfg = dict(
        dataset="digits",
        arch="vit",
        width=16,
        epochs=1,
        optimizer="adamw",
        lr=2e-3,
        device="cpu",
        precision="fp32",
        data_dir=str(tmp_path / "data"),
        checkpoint_dir=str(tmp_path / "ck"),
    )
    paths = [train(TrainConfig(**cfg, seed=s), progress=False) for s in (0, 1)]
    base = ["--data-dir", cfg["data_dir"], "--device", "cpu", "--n-images", "128", "--refit-n-images", "128"]
    assert (
        sweep_main(
            ["--checkpoint-dir", cfg["checkpoint_dir"], "--results-dir", str(tmp_path / "res"), "--finetune-epochs", "1", *base],
            "activation",
        )
        == 0
    ), capsys.readouterr().err
    (row,) = read_rows(tmp_path / "res" / "digits_activation.csv")
    assert row["arch"] == "vit" and float(row["fused"]) > 0
    assert (tmp_path / "res" / "finetune-digits.csv").is_file()
    assert main(["tune", *map(str, paths), "--n-trials", "1", "--results-dir", str(tmp_path / "res"), *base]) == 0
    assert (
        main(
            [
                "interpolate",
                *map(str, paths),
                "--points",
                "3",
                "--results-dir",
                str(tmp_path / "res"),
                "--data-dir",
                cfg["data_dir"],
                "--device",
                "cpu",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert list((tmp_path / "res").glob("interp-digits-vit-w16-*.png"))


def test_grouping_leaves_the_attention_layers_forward_as_it_was():
    import types

    plain, wrapped = _randomised(Encoder()), _randomised(Encoder())
    own = wrapped.att.forward = types.MethodType(lambda self, *a, **k: nn.MultiheadAttention.forward(self, *a, **k), wrapped.att)
    for model in (plain, wrapped):
        channel_groups(model, torch.randn(1, 7, 6))
    assert "forward" not in plain.att.__dict__ and wrapped.att.forward is own
