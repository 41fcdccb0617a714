"""The CIFAR-style ResNet18 and the architecture registry."""

import pytest
import torch

from otfuse.errors import OtfuseError
from otfuse.models import REGISTRY, build_model


@pytest.mark.parametrize("width,cin,size", [(8, 1, 8), (16, 3, 32), (64, 3, 32)])
def test_resnet18_shapes_and_widths(width, cin, size):
    m = build_model("resnet18", width, cin, 7)
    assert m(torch.randn(2, cin, size, size)).shape == (2, 7)
    assert m.conv1.out_channels == width and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert m.layer4[1].conv2.out_channels == 8 * width and [len(stage) for stage in (m.layer1, m.layer2, m.layer3, m.layer4)] == [
        2,
        2,
        2,
        2,
    ]
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())


def test_width_64_resnet18_has_the_usual_11m_parameters():
    assert abs(sum(p.numel() for p in build_model("resnet18", 64, 3, 10).parameters()) - 11_173_962) == 0


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(OtfuseError, match="unknown architecture 'resnet19'; choose one of resnet18"):
        build_model("resnet19")
    assert "resnet18" in REGISTRY


@pytest.mark.parametrize("width,cin,size,tokens", [(32, 1, 28, 49), (64, 3, 32, 64), (16, 1, 8, 64)])
def test_the_vit_takes_patches_from_the_image_size(width, cin, size, tokens):
    m = build_model("vit", width, cin, 7, image_size=size)
    assert m(torch.randn(2, cin, size, size)).shape == (2, 7)
    assert m.pos_embed.shape == (1, tokens + 1, width) and m.blocks[0].attn.num_heads == max(1, width // 16)


def test_a_vit_width_that_splits_no_heads_evenly_is_refused():
    with pytest.raises(OtfuseError, match=r"--width 50: vit gives one attention head per 16 channels \(3 heads\)"):
        build_model("vit", 50, 3, 10)


def test_a_trained_vit_loads_at_its_image_size(tmp_path):
    from otfuse.checkpoints import load_checkpoint
    from otfuse.train import TrainConfig, train

    path = train(
        TrainConfig(
            dataset="digits",
            arch="vit",
            width=16,
            epochs=1,
            device="cpu",
            precision="fp32",
            optimizer="adamw",
            lr=2e-3,
            data_dir=str(tmp_path / "data"),
            checkpoint_dir=str(tmp_path / "ck"),
        ),
        progress=False,
    )
    model, meta, _ = load_checkpoint(path)
    assert meta["image_size"] == 8 and model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert meta["config"]["optimizer"] == "adamw"
