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
    assert m.layer4[1].conv2.out_channels == 8 * width and [len(l) for l in (m.layer1, m.layer2, m.layer3, m.layer4)] == [2, 2, 2, 2]
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())


def test_width_64_resnet18_has_the_usual_11m_parameters():
    assert abs(sum(p.numel() for p in build_model("resnet18", 64, 3, 10).parameters()) - 11_173_962) == 0


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(OtfuseError, match="unknown architecture 'resnet19'; choose one of resnet18"):
        build_model("resnet19")
    assert "resnet18" in REGISTRY
