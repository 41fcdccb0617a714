"""Channel groups from DepGraph: permuting every group keeps the function; coverage is exact; bad layers fail clearly."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn

from otfuse import channel_groups, permute, random_maps
from otfuse.errors import OtfuseError
from otfuse.grouping.group import check_same_groups
from otfuse.models import build_model

from support import CatNet, randomize_bn, small_densenet, small_mobilenet_v2, small_resnet50, small_vgg_bn

CASES = {
    "resnet18-w8-rgb": (lambda: build_model("resnet18", 8, 3, 10), (2, 3, 32, 32)),
    "resnet18-w16-gray": (lambda: build_model("resnet18", 16, 1, 10), (2, 1, 28, 28)),
    "resnet18-w64-rgb": (lambda: build_model("resnet18", 64, 3, 10), (2, 3, 32, 32)),
    "resnet18-w64-gray": (lambda: build_model("resnet18", 64, 1, 10), (2, 1, 32, 32)),
    "tv-resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "tv-resnet50-small": (small_resnet50, (2, 3, 64, 64)),
    "tv-vgg_bn-small": (small_vgg_bn, (2, 3, 32, 32)),
    "tv-mobilenet_v2-small": (small_mobilenet_v2, (2, 3, 64, 64)),
    "tv-densenet-small": (small_densenet, (2, 3, 64, 64)),
    "catnet": (lambda: CatNet(), (2, 3, 8, 8)),
}


@functools.cache  # each case traced once: the tests read the model, never change it
def _setup(case: str):
    make, shape = CASES[case]
    torch.manual_seed(0)
    model = randomize_bn(make())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return model, x, channel_groups(model, x[:1])


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= rtol * a.abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_permuting_every_group_keeps_the_function(case):
    model, x, groups = _setup(case)
    permuted = permute(model, groups, random_maps(groups, seed=3))
    with torch.no_grad():
        assert _close(model(x), permuted(x))
    assert model.training is False


@pytest.mark.parametrize("case", ["resnet18-w8-rgb", "tv-densenet-small", "catnet"])
def test_permuting_one_member_alone_breaks_the_function(case):
    model, x, groups = _setup(case)
    perms = random_maps(groups, seed=3)
    for g in groups[:: max(1, len(groups) // 10)]:
        lone = permute(model, [type(g)(g.name, g.size, [g.members[0]])], {g.name: perms[g.name]})
        with torch.no_grad():
            assert not _close(model(x), lone(x)), f"permuting only {g.members[0].module} of {g.name} went unnoticed"


@pytest.mark.parametrize("case", list(CASES))
def test_every_channel_index_belongs_to_exactly_one_group(case):
    model, x, groups = _setup(case)
    _, _, classifier = _classifier(model, x)
    stems = _consumers_of_input(model, x)
    owners: dict[tuple[str, str, int], torch.Tensor] = {}
    for g in groups:
        for m in g.members:
            t = (
                model.get_submodule(m.module).get_parameter(m.tensor)
                if m.tensor in ("weight", "bias")
                else model.get_submodule(m.module).get_buffer(m.tensor)
            )
            count = owners.setdefault((m.module, m.tensor, m.axis), torch.zeros(t.shape[m.axis], dtype=torch.long))
            count.index_add_(0, m.index.reshape(-1), torch.ones(m.index.numel(), dtype=torch.long))
    for name, mod in model.named_modules():
        axes = _channel_axes(mod)
        for tensor, axis in axes:
            if (name == classifier and axis == 0) or (name in stems and axis == 1):
                continue  # the logits and the image channels are never permuted
            t = getattr(mod, tensor, None)
            if t is None or (tensor == "weight" and isinstance(mod, nn.Conv2d) and axis == 1 and mod.groups > 1):
                continue
            count = owners.get((name, tensor, axis))
            assert count is not None, f"{name}.{tensor} axis {axis} is in no group"
            assert torch.all(count == 1), f"{name}.{tensor} axis {axis}: some index in {sorted(set(count.tolist()))} groups"


def _classifier(model, x):
    """The last conv or linear layer run: it produces the logits."""
    ran, handles = [], []
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(lambda mod, i, o, n=n: ran.append(n)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return None, None, ran[-1]


def _consumers_of_input(model, x) -> set[str]:
    """Layers that read the image itself: their input channels belong to no group."""
    found, handles = set(), []
    for n, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda mod, inp, n=n: found.add(n) if inp and inp[0] is x else None))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


def _channel_axes(mod: nn.Module) -> list[tuple[str, int]]:
    if isinstance(mod, (nn.Conv2d, nn.Linear)):
        return [("weight", 0), ("weight", 1), ("bias", 0)]
    if isinstance(mod, nn.BatchNorm2d):
        return [(t, 0) for t in ("weight", "bias", "running_mean", "running_var")]
    return []


def test_groups_come_in_forward_order_and_name_their_root():
    model, x, groups = _setup("resnet18-w8-rgb")
    assert [g.name for g in groups][:3] == ["conv1", "layer1.0.conv1", "layer1.1.conv1"]
    assert [g.size for g in groups] == [8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64]
    # the stream of stage 1 ties the stem, both blocks' conv2 and the next stage's inputs
    stem = groups[0]
    outs = {m.module for m in stem.members if m.role == "out"}
    assert {"conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2", "layer1.1.bn2"} <= outs
    ins = {m.module for m in stem.members if m.role == "in"}
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"} <= ins


def test_linear_after_flatten_maps_many_indices_to_one_channel():
    model, x, groups = _setup("catnet")
    fc = [m for g in groups for m in g.members if m.module == "fc"]
    assert len(fc) == 1 and fc[0].index.shape == (8, 16)


def test_groups_of_different_models_are_told_apart():
    x = torch.randn(1, 3, 32, 32)
    a = channel_groups(build_model("resnet18", 8, 3, 10), x)
    check_same_groups(a, channel_groups(build_model("resnet18", 8, 3, 10), x))
    with pytest.raises(OtfuseError, match="conv1 has 8 channels in the first but 16"):
        check_same_groups(a, channel_groups(build_model("resnet18", 16, 3, 10), x))
    with pytest.raises(OtfuseError, match="channel groups"):
        check_same_groups(a, channel_groups(small_vgg_bn(), torch.randn(1, 3, 32, 32)))


class GroupedTransposeNet(nn.Module):
    """A grouped transposed conv: its weight's blocks are laid out (in, out / groups), which otfuse does not permute."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.t = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.t(torch.relu(self.a(x)))).mean((2, 3)))


# GroupNorm with several groups, once refused here, is exact now (tests/test_splits.py)
@pytest.mark.parametrize("net,name", [(GroupedTransposeNet, "module t is a grouped transposed conv")])
def test_layers_that_cannot_be_permuted_exactly_give_one_clear_error(net, name):
    with pytest.raises(OtfuseError, match=name):
        channel_groups(net(), torch.randn(1, 3, 8, 8))


@pytest.fixture
def versions(monkeypatch):
    """Installed versions as the test says (check_versions reads them once per process: cleared around the test)."""
    import types

    import otfuse.grouping.adapter as G

    def installed(tp_version: str) -> None:
        monkeypatch.setattr(G, "metadata", types.SimpleNamespace(version=lambda name: tp_version))
        G.check_versions.cache_clear()

    yield installed
    G.check_versions.cache_clear()


def test_the_tested_versions_are_named_and_others_refused_in_one_line(versions, monkeypatch):
    from otfuse.grouping.adapter import check_versions, untested_versions

    assert untested_versions("2.11.0+cu130", "1.6.1") == ""  # the GPU machine's torch
    assert untested_versions("2.14.1+cu130", "1.6.1") == ""  # this project's pin
    assert untested_versions("2.10.2", "1.6.1") == "torch 2.10.2"
    assert untested_versions("2.15.0", "1.6.0") == "torch-pruning 1.6.0 and torch 2.15.0"
    versions("1.6.0")
    monkeypatch.delenv("OTFUSE_UNTESTED_VERSIONS", raising=False)
    with pytest.raises(OtfuseError, match=r"tested with torch-pruning 1.6.1 with torch 2.11 to 2.14, not torch-pruning 1.6.0: install"):
        check_versions()
    versions("1.6.0")
    monkeypatch.setenv("OTFUSE_UNTESTED_VERSIONS", "1")
    with pytest.warns(UserWarning, match="not tested with"):
        check_versions()


def test_an_untested_torch_pruning_stops_the_grouping_before_any_trace(versions, monkeypatch):
    monkeypatch.delenv("OTFUSE_UNTESTED_VERSIONS", raising=False)
    versions("1.7.0")
    with pytest.raises(OtfuseError, match="not torch-pruning 1.7.0"):
        channel_groups(build_model("resnet18", 4, 3, 10, 8), torch.zeros(2, 3, 8, 8))
