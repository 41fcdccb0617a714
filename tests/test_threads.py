"""Two fusions in two threads of one process (a notebook, a server, the federated strategy) give the results of
running them one after the other, and leave torch and Torch-Pruning as they found them: the grouping's patches are
scoped to the thread (einsum: a torch function mode) or taken one at a time (Torch-Pruning's: a lock)."""

from __future__ import annotations

import threading

import torch
import torch_pruning as tp
from torch import nn

from otfuse import channel_groups
from otfuse.fusion import FuseConfig, fuse

from support import CatNet, EinsumOnMaps, randomize_bn


def _pair(cls, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [randomize_bn(cls(), seed), randomize_bn(cls(), seed + 1)]


def _work(models: list[nn.Module], seed: int) -> tuple[list, dict]:
    """One model's channel groups and the fusion of two of them: what a thread computes."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    groups = [(g.name, g.size, [(m.module, m.tensor, m.axis) for m in g.members]) for g in channel_groups(models[0], x)]
    fused = fuse(models, images, ((0.5,) * 3, (0.25,) * 3), FuseConfig()).fused.state_dict()
    return groups, fused


def test_two_fusions_in_two_threads_equal_the_two_run_one_after_the_other():
    pairs = {cls.__name__: _pair(cls, 3) for cls in (EinsumOnMaps, CatNet)}  # made here: the global generator is shared
    alone = {name: _work(models, 3) for name, models in pairs.items()}
    einsum, detect = torch.einsum, tp.DependencyGraph._detect_unwrapped_parameters
    concat = tp.dependency.index_mapping.update_concat_index_mapping
    results: dict[str, list] = {name: [] for name in pairs}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(name: str):
        try:
            start.wait()
            for _ in range(3):
                results[name].append(_work(pairs[name], 3))
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for name, (groups, fused) in alone.items():
        assert len(results[name]) == 3
        for g, f in results[name]:
            assert g == groups
            assert all(torch.equal(f[k], fused[k]) for k in fused), name
    assert torch.einsum is einsum  # nothing left replaced
    assert tp.DependencyGraph._detect_unwrapped_parameters is detect
    assert tp.dependency.index_mapping.update_concat_index_mapping is concat
