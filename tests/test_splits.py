"""Channel splits, slices, gates, norm groups, parametrised and tied weights: exact, or refused in one line.

Each pattern of support.PATTERNS is what users write (Res2Net's hierarchical split, a Ghost module's
concatenate-then-cut, mixed kernels, a GLU gate, a residual on some channels, GroupNorm, weight_norm,
spectral_norm, one conv called twice, a pixel shuffle and unshuffle, SKNet's selective kernel,
ResNeSt's split attention). For each: permuting every group keeps the function, and fusing
the model with a permuted copy of itself returns the model, with every alignment method. A grouping
that would not be exact is refused by the exactness check, never returned.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from otfuse.errors import OtfuseError
from otfuse.grouping.exact import channel_groups, check_exact
from otfuse.grouping.group import ChannelGroup
from otfuse.grouping.trace import find_groups
from otfuse.maps import permute, random_maps
from otfuse.models import build_model

from support import METHODS, PATTERNS, assert_returns_model, random_data, randomize_bn


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(PATTERNS[name]())


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", list(PATTERNS))
def test_permuting_every_group_of_every_pattern_keeps_the_function(name):
    model, x = _model(name), torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    groups = channel_groups(model, x[:1])
    with torch.no_grad():
        for seed in range(3):
            assert _error(model(x), permute(model, groups, random_maps(groups, seed=seed, cycles=True))(x)) < 1e-5


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("method", METHODS)
def test_the_oracle_holds_for_every_pattern_and_method(name, method):
    assert_returns_model(_model(name), random_data((3, 8, 8)), method, n_images=32)


def test_a_pixel_shuffle_moves_each_channels_block_of_sub_pixels_together():
    groups = channel_groups(_model("pixel-shuffle"), torch.randn(1, 3, 8, 8))
    producer = next(m for m in groups[0].members if m.module == "c" and m.tensor == "weight")
    consumer = next(m for m in groups[0].members if m.module == "d" and m.tensor == "weight")
    assert producer.index.tolist() == [[4 * c + k for k in range(4)] for c in range(4)] and consumer.index.tolist() == [
        [c] for c in range(4)
    ]


def test_a_split_becomes_one_group_per_part_and_merging_the_parts_is_refused():
    model, x = _model("split"), torch.randn(1, 3, 8, 8)
    groups = find_groups(model, x)
    parts = [g for g in groups if g.name.startswith("c[")]
    assert sorted(g.size for g in parts) == [3, 5]
    # one group across both parts (what Torch-Pruning's own grouping amounts to) moves channels between the convs a and b
    merged = ChannelGroup(
        "c",
        8,
        [
            type(m)(m.module, m.tensor, m.axis, torch.cat([p.members[i].index for p in parts]), m.role, m.kind)
            for i, m in enumerate(parts[0].members)
            if m.role == "out"
        ],
    )
    with pytest.raises(OtfuseError, match="permuting channel group c .*changes what the model computes"):
        check_exact(model, [merged], x)


def test_a_glu_gate_moves_both_halves_of_a_channel_together():
    groups = channel_groups(_model("glu"), torch.randn(1, 3, 8, 8))
    producer = next(m for m in groups[0].members if m.module == "c" and m.tensor == "weight")
    assert producer.index.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]  # channel i gates channel i + 4


def test_groupnorm_channels_move_within_their_norm_groups():
    groups = channel_groups(_model("groupnorm"), torch.randn(1, 3, 8, 8))
    assert groups[0].blocks.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_parametrised_weights_are_carried_through_the_tensors_the_model_stores():
    model = _model("weight-norm")
    groups = channel_groups(model, torch.randn(1, 3, 8, 8))
    stored = {(m.module, m.tensor, m.axis) for g in groups for m in g.members}
    assert ("c.parametrizations.weight", "original1", 0) in stored  # v, by output channel
    assert ("d.parametrizations.weight", "original1", 1) in stored  # v, by input channel
    assert ("c.parametrizations.weight", "original0", 0) in stored  # g, one per output channel


class _Reshuffle(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op, self.c, self.d, self.fc = op, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 1), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.d(self.op(torch.relu(self.c(x))))).mean((2, 3)))


class _Flip(nn.Module):
    def forward(self, x):
        return x.flip(1)


class _CumSum(nn.Module):
    def forward(self, x):
        return x.cumsum(1)


def _orthogonal():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.d, self.fc = nn.Linear(5, 8), nn.utils.parametrizations.orthogonal(nn.Linear(8, 8)), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.d(torch.relu(self.c(x)))))

    return Net(), torch.randn(1, 5)


def _old_weight_norm():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc = nn.utils.weight_norm(nn.Conv2d(3, 8, 3, padding=1)), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c(x)).mean((2, 3)))

    return Net(), torch.randn(1, 3, 8, 8)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    "case,match",
    [
        (lambda: (_Reshuffle(nn.ChannelShuffle(2)), torch.randn(1, 3, 8, 8)), "uses channel_shuffle"),
        (lambda: (_Reshuffle(_Flip()), torch.randn(1, 3, 8, 8)), "permuting channel group c .*changes what the model computes"),
        (lambda: (_Reshuffle(_CumSum()), torch.randn(1, 3, 8, 8)), "permuting channel group c .*changes what the model computes"),
        (_orthogonal, "module d's parametrised weight does not commute"),
        (_old_weight_norm, "module c uses the deprecated torch.nn.utils.weight_norm"),
    ],
)
def test_what_cannot_be_permuted_exactly_is_one_clear_error(case, match):
    model, x = case()
    with pytest.raises(OtfuseError, match=match) as info:
        channel_groups(model.eval(), x)
    assert "\n" not in str(info.value)


def test_the_refit_refuses_a_parametrisation_it_cannot_write():
    from otfuse.fusion import fuse

    from support import config

    model, data = _model("spectral-norm"), random_data((3, 8, 8))
    torch.manual_seed(1)
    other = randomize_bn(PATTERNS["spectral-norm"](), seed=1)  # not a permuted copy: the refit must change the weights
    with pytest.raises(OtfuseError, match="parametrised weight.*--no-refit"):
        fuse([model, other], data.train_x, data.norm, config(n_images=32, bn_batches=0, refit_n_images=32))


def test_resnet18_groups_are_unchanged_by_the_split_handling():
    groups = channel_groups(build_model("resnet18", 8, 3, 10), torch.randn(1, 3, 16, 16))
    assert not any("[" in g.name for g in groups) and len(groups) == 12


def test_split_attention_moves_each_channel_in_every_radix_and_keeps_the_grouped_inputs_blocks():
    groups = channel_groups(_model("split-attention"), torch.randn(1, 3, 8, 8))
    weight = lambda g, axis: next((m for m in g.members if m.module == "conv" and m.tensor == "weight" and m.axis == axis), None)
    out = next(g for g in groups if weight(g, 0) is not None)
    assert weight(out, 0).index.tolist() == [[c, 8 + c] for c in range(8)] and out.blocks is None
    inp = next(g for g in groups if weight(g, 1) is not None)  # radix r reads input block r: the blocks cannot swap
    assert inp.blocks.tolist() == [0, 0, 1, 1] and inp.pinned
    assert all(torch.equal(random_maps(groups, seed=s)[inp.name].perm // 2, torch.tensor([0, 0, 1, 1])) for s in range(5))
