"""timm architectures by name (`--arch timm:<name>`): trained, saved, loaded and fused like the registry's."""

from __future__ import annotations

import pytest
import torch

from otfuse.checkpoints import load_checkpoint
from otfuse.cli import main
from otfuse.errors import OtfuseError
from otfuse.models import build_model
from otfuse.train import TrainConfig, checkpoint_path, train

from support import assert_returns_model, random_data, randomize_bn

pytest.importorskip("timm")


def test_a_timm_model_builds_offline_with_the_data_shape():
    model = build_model("timm:mixnet_s", 0, 1, 7)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize(
    "arch,width,match",
    [("timm:mixnet_s", 16, "timm models have no width knob"), ("timm:no_such_net", 0, "timm has no model 'no_such_net'")],
)
def test_timm_names_and_widths_are_checked(arch, width, match):
    with pytest.raises(OtfuseError, match=match):
        build_model(arch, width, 3, 10)


@pytest.mark.parametrize("method", ["activation", "weight-matching"])
def test_the_oracle_holds_for_a_timm_split_architecture(method):
    torch.manual_seed(0)
    assert_returns_model(randomize_bn(build_model("timm:ghostnet_050", 0, 3, 10)).eval(), random_data((3, 32, 32)), method, n_images=64)


def test_train_and_fuse_a_timm_model_from_the_cli(tmp_path, capsys):
    cfg = dict(
        dataset="digits",
        arch="timm:resnet10t",
        epochs=1,
        batch_size=256,
        device="cpu",
        precision="fp32",
        data_dir=str(tmp_path / "data"),
        checkpoint_dir=str(tmp_path / "ck"),
    )
    paths = [train(TrainConfig(**cfg, seed=s), progress=False) for s in (0, 1)]
    assert paths[0] == checkpoint_path(TrainConfig(**cfg)) and paths[0].parent.name == "timm-resnet10t-w0"
    model, meta, _ = load_checkpoint(paths[0])
    assert meta["arch"] == "timm:resnet10t" and meta["width"] == 0
    assert (
        main(
            [
                "fuse",
                *map(str, paths),
                "--out",
                str(tmp_path / "f.pt"),
                "--n-images",
                "64",
                "--bn-batches",
                "2",
                "--no-refit",
                "--data-dir",
                cfg["data_dir"],
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert load_checkpoint(tmp_path / "f.pt")[1]["arch"] == "timm:resnet10t"
    assert main(["fuse", *map(str, paths), "--width", "8", "--data-dir", cfg["data_dir"], "--device", "cpu"]) == 2
    assert "timm models have no width knob" in capsys.readouterr().err
