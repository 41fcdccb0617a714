"""Fixtures and hooks; the shared test models and helpers are in support.py. Nothing heavy is imported here: the
pytest-xdist controller loads this file too, and runs no test."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

# run_tests.sh runs two pytest-xdist workers on the 2 cores: one thread each, not two threads fighting for one core;
# the commands and scripts a test starts inherit one thread too (PyTorch's idle threads spin)
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):  # not the controller
        import gc

        import torch

        # a test process makes and drops many small objects (traces, DepGraph, fixtures): Python's default 700
        # allocations between young-generation collections spent a tenth of the run in the collector (docs/speed.md)
        gc.set_threshold(10_000, 20, 20)

        torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(items: list) -> None:
    """The files with the most slow tests first, then those with the most tests: pytest-xdist hands whole files
    (--dist loadfile) to its workers in this order (with --no-loadscope-reorder; by default it orders them by their
    number of tests alone), so the long ones start early and the two workers finish together."""
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    count = Counter(item.path for item in items)
    first = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-slow[item.path], -count[item.path], first[item.path]))


@pytest.fixture
def tmp_data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Two digits ResNet18s (width 8), trained for a few epochs, and their data: trained once per run, the xdist
    workers sharing them through the folder above their own temporary folders (no test writes beside them)."""
    shared = tmp_path_factory.getbasetemp()
    shared = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared
    root = shared / "trained"
    done = shared / "trained.paths"
    from filelock import FileLock

    from otfuse.checkpoints import load_checkpoint
    from otfuse.data import load_dataset

    with FileLock(str(shared / "trained.lock")):
        if not done.is_file():
            done.write_text("\n".join(map(str, _trained_pair(root))))
        paths = [Path(p) for p in done.read_text().splitlines()]
    return [load_checkpoint(p)[0] for p in paths], load_dataset("digits", root / "data"), paths, root


def _trained_pair(root: Path) -> list[Path]:
    from otfuse.train import TrainConfig, train

    # fp32: the same parents on every machine, whether or not its CPU has native bf16 (which `auto` would pick)
    cfgs = [
        TrainConfig(
            dataset="digits",
            width=8,
            epochs=8,
            batch_size=64,
            lr=0.1,
            seed=s,
            device="cpu",
            precision="fp32",
            data_dir=str(root / "data"),
            checkpoint_dir=str(root / "ck"),
        )
        for s in (0, 1)
    ]
    return [train(c, progress=False) for c in cfgs]
