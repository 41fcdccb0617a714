"""Fusing across widths: a model carried onto a wider target by duplication computes the same function,
compressing it back merges the duplicates, parents of different widths fuse, and bad inputs are one line."""

from __future__ import annotations

import pytest
import torch

from otfuse import channel_groups, permute, random_maps
from otfuse.align import channel_importance, merge_plan, split_plan
from otfuse.cli import main
from otfuse.data import ImageData, normalize
from otfuse.errors import OtfuseError
from otfuse.evaluate import logits
from otfuse.fusion import fuse
from otfuse.models import build_model
from otfuse.precision import Precision
from otfuse.train import TrainConfig, train

from support import config, randomize_bn


def _data(n: int = 64) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData("random", [str(i) for i in range(10)], x, y, x[:8], y[:8], x[:16], y[:16], (0.5,) * 3, (0.25,) * 3, False)


EXACT = dict(n_images=64, bn_batches=0, refit=False)  # no statistics re-estimated: the carried model itself


def _model(width: int, seed: int = 0):
    torch.manual_seed(seed)
    return randomize_bn(build_model("resnet18", width, 3, 10), seed)


@pytest.mark.parametrize("factor", [2, 3])
def test_a_model_carried_onto_a_wider_target_computes_the_same_function(factor):
    data, model = _data(), _model(4)
    wide = fuse([model], data.train_x, data.norm, config(**EXACT), target=build_model("resnet18", 4 * factor, 3, 10)).fused
    assert wide.conv1.weight.shape[0] == 4 * factor
    z, z_wide = logits(model, data.train_x, data.norm, Precision.FP32), logits(wide, data.train_x, data.norm, Precision.FP32)
    assert torch.allclose(z, z_wide, atol=1e-4 * z.abs().max().item())


def test_compressing_a_widened_model_merges_the_copies_and_gives_it_back():
    data, model = _data(), _model(4)
    wide = fuse([model], data.train_x, data.norm, config(**EXACT), target=build_model("resnet18", 8, 3, 10)).fused
    back = fuse([wide], data.train_x, data.norm, config(**EXACT), target=build_model("resnet18", 4, 3, 10)).fused
    z, z_back = logits(model, data.train_x, data.norm, Precision.FP32), logits(back, data.train_x, data.norm, Precision.FP32)
    assert torch.allclose(z, z_back, atol=1e-4 * z.abs().max().item())


def test_split_and_merge_plans_keep_uniform_marginals():
    split = split_plan(4, 8)
    assert split.perm is None and ((split.plan > 0).sum(1) == 1).all() and ((split.plan > 0).sum(0) == 2).all()
    corr = torch.eye(6, dtype=torch.float64)
    corr[0, 3] = corr[3, 0] = corr[1, 4] = corr[4, 1] = corr[2, 5] = corr[5, 2] = 0.9
    merged = merge_plan(corr, 3)
    pairs = {tuple(sorted(row.nonzero().flatten().tolist())) for row in merged.plan}
    assert pairs == {(0, 3), (1, 4), (2, 5)}  # the correlated channels merge


def test_importance_marginals_weight_the_channels_and_keep_the_oracle():
    data, model = _data(), _model(4)
    copy = permute(model, groups := channel_groups(model, torch.randn(1, 3, 16, 16)), random_maps(groups, seed=2))
    result = fuse([model, copy], data.train_x, data.norm, config(marginals="importance", **EXACT))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(result.fused_no_bn.state_dict().values(), model.state_dict().values()))
    wide = _model(8, 1)
    mass = channel_importance(wide, channel_groups(wide, torch.randn(1, 3, 16, 16)))
    result = fuse([model, wide], data.train_x, data.norm, config(marginals="importance", **EXACT))
    for g in result.groups:
        plan = result.maps[1][g.name].plan  # the width-8 parent onto the width-4 anchor: soft, its columns hold its masses
        assert plan.shape[1] == 2 * plan.shape[0] and torch.allclose(plan.sum(0) / plan.sum(), mass[g.name] / mass[g.name].sum(), atol=1e-6)


def test_parents_of_different_widths_fuse_into_either_width():
    data = _data()
    a, b = _model(8, 0), _model(4, 1)
    x = normalize(data.train_x, data.norm)
    for width in (8, 4, 6):
        result = fuse(
            [a, b],
            data.train_x,
            data.norm,
            config(n_images=64, bn_batches=2, refit_n_images=64),
            target=build_model("resnet18", width, 3, 10),
        )
        assert result.fused.conv1.weight.shape[0] == width
        assert all(torch.isfinite(t).all() for t in result.fused.state_dict().values() if t.is_floating_point())
        # the refit pulls every layer to the parents' mean output: nearer it than either parent alone
        with torch.no_grad():
            mean = (a.eval()(x) + b.eval()(x)) / 2
            gap = lambda m, mean=mean: float((m.eval()(x) - mean).norm())
            assert gap(result.fused) < min(gap(a), gap(b))
    # all the weight on the anchor, into its own width: the anchor itself, whatever the other parent's width
    alone = fuse([a, b], data.train_x, data.norm, config(weights="1,0", **EXACT), target=build_model("resnet18", 8, 3, 10))
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(alone.fused.state_dict().values(), a.state_dict().values()))
    with pytest.raises(OtfuseError, match="aligns models of one width only"):
        fuse([a, b], data.train_x, data.norm, config(method="weight", n_images=64))
    with pytest.raises(OtfuseError, match="--repair matches the aligned parents' channel statistics"):
        fuse([a, b], data.train_x, data.norm, config(repair=True, n_images=64))


@pytest.mark.slow
def test_cli_fuses_mixed_widths_and_compresses_one_model(trained, tmp_path, capsys):
    _, _, paths, root = trained
    narrow = train(
        TrainConfig(
            dataset="digits",
            width=4,
            epochs=4,
            batch_size=64,
            lr=0.1,
            seed=1,
            device="cpu",
            data_dir=str(root / "data"),
            out=str(tmp_path / "w4.pt"),
        ),
        progress=False,
    )
    base = ["--data-dir", str(root / "data"), "--device", "cpu", "--bn-batches", "4", "--split", "val"]
    out = tmp_path / "fused.pt"
    assert main(["fuse", str(paths[0]), str(narrow), "--out", str(out), *base]) == 0
    text = capsys.readouterr().out
    assert "w8+w4 -> w8" in text and "vanilla" not in text and "fused_repair" not in text
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["width"] == 8 and meta["parent_widths"] == [8, 4]
    small = tmp_path / "small.pt"
    assert main(["fuse", str(paths[0]), "--width", "6", "--out", str(small), *base]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(small), "--data-dir", str(root / "data")]) == 0  # loads like any other checkpoint
    assert main(["fuse", str(paths[0]), "--width", "-2", "--out", str(tmp_path / "x.pt"), *base]) == 2
    assert "--width -2 must be from 1 to 512" in capsys.readouterr().err
    assert main(["fuse", str(paths[0]), str(narrow), "--method", "weight", "--out", str(tmp_path / "x.pt"), *base]) == 2
    assert "one width only" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_the_fusion_scripts_and_tune_fuse_mixed_widths(trained, tmp_path, capsys):
    import shutil

    from otfuse.results import read_rows
    from otfuse.sweep import main as sweep_main

    _, _, paths, root = trained
    ck = tmp_path / "ck" / "digits"
    (ck / "resnet18-w8").mkdir(parents=True)
    for p in paths:
        shutil.copy(p, ck / "resnet18-w8" / p.name)
    train(
        TrainConfig(
            dataset="digits",
            width=4,
            epochs=4,
            batch_size=64,
            lr=0.1,
            seed=1,
            device="cpu",
            data_dir=str(root / "data"),
            checkpoint_dir=str(tmp_path / "ck"),
        ),
        progress=False,
    )
    base = ["--data-dir", str(root / "data"), "--device", "cpu", "--bn-batches", "4"]
    code = sweep_main(
        ["--checkpoint-dir", str(tmp_path / "ck"), "--results-dir", str(tmp_path / "res"), "--widths", "8,4", "--width", "8", *base],
        "activation",
    )
    assert code == 0, capsys.readouterr().err
    (row,) = read_rows(tmp_path / "res" / "digits_activation.csv")
    assert (row["width"], row["widths"], row["seeds"]) == ("8", "8-4", "0-1") and float(row["fused"]) > 50
    assert "resnet18 w8+w4 -> w8" in (tmp_path / "res" / "summary.md").read_text()
    assert (ck / "resnet18-w8" / "fused-activation-w8s0-w4s1.pt").is_file()
    code = main(
        [
            "tune",
            str(paths[0]),
            str(ck / "resnet18-w4" / "seed1.pt"),
            "--width",
            "6",
            "--n-trials",
            "1",
            "--results-dir",
            str(tmp_path / "res"),
            *base,
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "res").glob("tune-digits-resnet18-w6-from-w8-w4-seed0-seed1-*-best.json"))) == 1
