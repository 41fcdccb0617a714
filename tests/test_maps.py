"""Channel maps: the transport solver on square, non-square and soft problems, and carrying a model through maps."""

from __future__ import annotations

import itertools

import pytest
import torch

from otfuse.errors import OtfuseError
from otfuse.grouping.exact import channel_groups
from otfuse.maps import ChannelMap, carry, permute, random_maps, transport_map
from otfuse.models import build_model

from support import CatNet, randomize_bn


def _cost(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_square_exact_transport_is_the_cheapest_permutation():
    cost = _cost(6, 6)
    m = transport_map(cost)
    assert m.perm is not None and sorted(m.perm.tolist()) == list(range(6))
    best = min(itertools.permutations(range(6)), key=lambda p: sum(cost[i, p[i]] for i in range(6)))
    assert m.perm.tolist() == list(best)


def test_a_permuted_cost_gives_the_permutation_back():
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    cost = 1.0 - torch.eye(9, dtype=torch.float64)[:, perm]  # zero cost exactly where target c meets source perm[c]
    assert torch.equal(transport_map(cost).perm, perm)


def test_non_square_transport_keeps_both_marginals_and_splits_each_source():
    cost = _cost(8, 4)  # 8 target channels, 4 source channels: each source's mass goes to two targets
    m = transport_map(cost)
    assert m.perm is None and (m.n_target, m.n_source) == (8, 4)
    assert torch.allclose(m.plan.sum(1), torch.full((8,), 1 / 8, dtype=torch.float64))
    assert torch.allclose(m.plan.sum(0), torch.full((4,), 1 / 4, dtype=torch.float64))
    assert torch.allclose(m.outputs().sum(1), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(m.inputs().sum(0), torch.ones(4, dtype=torch.float64))
    # exact OT is sparse: every target takes one source here (8 = 2 x 4)
    assert ((m.plan > 0).sum(1) == 1).all()


def test_narrowing_transport_merges_sources_into_fewer_targets():
    m = transport_map(_cost(3, 6))
    assert torch.allclose(m.plan.sum(0), torch.full((6,), 1 / 6, dtype=torch.float64))
    assert ((m.plan > 0).sum(0) == 1).all()  # each source goes to one target, two per target


def test_soft_transport_is_a_regularised_plan_near_the_exact_one():
    cost = _cost(6, 6)
    soft = transport_map(cost, "sinkhorn", reg=0.01)
    assert soft.perm is None
    assert torch.allclose(soft.plan.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64), atol=1e-6)
    assert torch.equal(soft.plan.argmax(1), transport_map(cost).perm)
    blurred = transport_map(cost, "sinkhorn", reg=100.0)
    assert (blurred.plan - 1 / 36).abs().max() < 1e-3  # strong regularisation: every channel mixed evenly


def test_bad_solver_inputs_are_one_clear_error():
    with pytest.raises(OtfuseError, match="--solver"):
        transport_map(_cost(3, 3), "magic")
    with pytest.raises(OtfuseError, match="NaN"):
        transport_map(torch.full((3, 3), float("nan")))
    with pytest.raises(OtfuseError, match="permutation"):
        ChannelMap.permutation(torch.tensor([0, 0, 1]))


def test_chained_permutations_compose():
    a, b = ChannelMap.permutation(torch.tensor([2, 0, 1])), ChannelMap.permutation(torch.tensor([1, 2, 0]))
    x = torch.arange(3.0)
    assert torch.equal(x[a.perm][b.perm], x[a.then(b).perm])


@pytest.mark.parametrize(
    "make,shape", [(lambda: build_model("resnet18", 8, 3, 10), (2, 3, 16, 16)), (CatNet, (2, 3, 8, 8))], ids=["resnet18", "catnet"]
)
def test_carrying_through_permutations_keeps_the_function(make, shape):
    torch.manual_seed(0)
    model = randomize_bn(make())
    x = torch.randn(*shape)
    groups = channel_groups(model, x[:1])
    maps = random_maps(groups, seed=2)
    out = carry(model, groups, maps)
    with torch.no_grad():
        assert torch.allclose(model(x), out(x), atol=1e-5)
    same = permute(model, groups, {name: m.perm for name, m in maps.items()})
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), same.state_dict().values()))


def test_a_soft_doubly_stochastic_map_is_applied_to_producers_and_consumers_alike():
    torch.manual_seed(0)
    model = randomize_bn(build_model("resnet18", 4, 3, 10))
    groups = channel_groups(model, torch.randn(1, 3, 16, 16))
    g = groups[1]  # layer1.0.conv1's channels: produced by conv1 + bn1, read by conv2
    plan = torch.full((g.size, g.size), 1.0 / g.size**2, dtype=torch.float64)
    out = carry(model, groups, {g.name: ChannelMap.from_plan(plan)})
    w = out.state_dict()
    # every producer row becomes the mean row; every consumer column the mean column
    src = model.state_dict()
    assert torch.allclose(
        w["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"].mean(0, keepdim=True).expand_as(src["layer1.0.conv1.weight"])
    )
    assert torch.allclose(
        w["layer1.0.conv2.weight"], src["layer1.0.conv2.weight"].mean(1, keepdim=True).expand_as(src["layer1.0.conv2.weight"])
    )


def test_a_sinkhorn_plan_that_did_not_converge_is_refused_not_used(monkeypatch):
    """A plan whose marginals do not hold (Sinkhorn stopped before converging) maps channels at random: it is one
    clear error, never a silent fusion. POT's own warning is not printed: the check says it in one line."""
    import warnings

    import numpy as np
    import ot

    cost = torch.from_numpy(np.random.default_rng(0).random((64, 64)))
    assert transport_map(cost, solver="sinkhorn", reg=0.05).perm is None
    half_done = lambda a, b, m, reg, **kw: np.exp(-m / reg) / np.exp(-m / reg).sum() * (1 + np.arange(len(a)))[:, None] / len(a)
    monkeypatch.setattr(ot, "sinkhorn", half_done)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(OtfuseError, match="Sinkhorn did not converge"):
            transport_map(cost, solver="sinkhorn", reg=1e-3)
