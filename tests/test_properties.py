"""The one-line-or-success contract, on generated inputs (Hypothesis): checkpoint metadata, `--config` JSON and option
values of every kind a file or a shell can hold. Each command exits 0 or 2, never with a traceback, and on exit 2 it
wrote nothing. The work after validation (fusion, the training loop) is replaced by a stub: what is under test is
everything that decides whether an input is taken."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import otfuse.cli as cli
import otfuse.train as train_module
from otfuse.fusion import FuseConfig
from otfuse.options import options_of
from otfuse.train import TrainConfig

# bounded: the three properties together take well under a minute on two cores; OTFUSE_EXAMPLES=500 searches wider
# (with fresh random examples instead of the fixed ones the suite runs)
EXAMPLES = int(os.environ.get("OTFUSE_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=EXAMPLES == 40)

# what JSON and a checkpoint's metadata can hold: numbers at and beyond every limit, text with control characters
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -1, 2**31, 2**63, 1e-300, 1e308, "", "0", "nan", "digits", "\x1b[2K", "caf\udce9"])
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8
)
# a dataset name from text could name one that downloads or a folder as large as the file system: only these
DATASETS = st.sampled_from(["digits", "nosuch", "imagefolder:/nonexistent", "imagefolder:", "", "digits\x1b[1A", "DIGITS"])
META_KEYS = [
    "arch", "width", "in_channels", "num_classes", "dataset", "mean", "std", "image_size", "val_size", "seed", "epoch",
    "kind", "classes", "subset", "parts", "parent_subsets", "parents", "parent_digests", "config", "history",
    "train_acc", "data_digest", "weights_digest", "parent_optimizer",
]  # fmt: skip


def _meta_value(key: str):
    return DATASETS if key == "dataset" else VALUES


CHANGES = st.lists(st.sampled_from(META_KEYS), max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({k: _meta_value(k) for k in keys})
)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "data" not in p.relative_to(root).parts}


def _run(argv: list[str], root: Path) -> int:
    before = _files(root)
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code in (0, 2), f"exit {code} for {argv}"
    if code == 2:
        assert _files(root) == before, f"files written on exit 2 for {argv}"
    return code


@pytest.fixture(scope="module")
def parents(trained):
    _, _, paths, root = trained
    return paths, root / "data"


@SETTINGS
@given(changes=CHANGES, dropped=st.lists(st.sampled_from(META_KEYS), max_size=2, unique=True))
def test_any_checkpoint_metadata_is_evaluated_or_refused_in_one_line(parents, changes, dropped):
    paths, data = parents
    raw = torch.load(paths[0], weights_only=True)
    meta = {k: v for k, v in {**raw["meta"], **changes}.items() if k not in dropped}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.save({**raw, "meta": meta}, root / "m.pt")
        _run(["evaluate", str(root / "m.pt"), "--device", "cpu", "--data-dir", str(data)], root)


FUSE_NAMES = [o.name for o in options_of(FuseConfig)]
CONFIGS = st.one_of(
    st.dictionaries(st.sampled_from(FUSE_NAMES) | st.text(max_size=10), VALUES, max_size=4).map(json.dumps),
    st.text(max_size=40),  # not JSON at all
    st.sampled_from(['{"n_images": 1' + "0" * 30 + "}", "[" * 5000, '{"a": 1, "a": 2}', "\ufeff{}", "{}"]),
)


@SETTINGS
@given(text=CONFIGS)
def test_any_config_file_is_taken_or_refused_in_one_line(parents, text, monkeypatch_module):
    paths, data = parents
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "c.json").write_text(text, encoding="utf-8", errors="surrogateescape")
        argv = ["fuse", str(paths[0]), str(paths[1]), "--config", str(root / "c.json"), "--out", str(root / "f.pt")]
        _run([*argv, "--device", "cpu", "--data-dir", str(data)], root)


TRAIN_FLAGS = [o for o in options_of(TrainConfig) if o.name not in ("dataset", "data_dir", "checkpoint_dir", "out", "parts", "device")]
TEXTS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "-1", "1e-13", "0x10", "1_000", "", " ", "--", "nan", "inf", "0-4", "0,3,5-9", "99-2"]),
    st.text(max_size=10).filter(lambda t: not t.startswith("-")),
)


@SETTINGS
@given(options=st.lists(st.tuples(st.sampled_from(TRAIN_FLAGS), TEXTS), max_size=4))
def test_any_option_values_are_taken_or_refused_in_one_line(parents, options, monkeypatch_module):
    _, data = parents
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        argv = ["train", "--dataset", "digits", "--out", str(root / "m.pt"), "--device", "cpu", "--data-dir", str(data)]
        for o, value in options:
            argv += [o.flag] if o.kind is bool else [o.flag, value]
        _run(argv, root)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """The fusion and the training loop stubbed: each property checks what is decided before them."""
    mp = pytest.MonkeyPatch()
    mp.setattr(cli, "_fuse", lambda args, inputs: 0)
    mp.setattr(train_module, "_train", lambda cfg, path, *a, **k: path)
    yield mp
    mp.undo()


def test_the_generators_reach_both_outcomes(parents, monkeypatch_module):
    """The properties above are only worth their examples if inputs of both kinds occur: one of each, written out."""
    paths, data = parents
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copy(paths[0], root / "a.pt")
        assert _run(["evaluate", str(root / "a.pt"), "--device", "cpu", "--data-dir", str(data)], root) == 0
        (root / "c.json").write_text(json.dumps({"n_images": math.inf}))
        argv = ["fuse", str(paths[0]), str(paths[1]), "--config", str(root / "c.json"), "--out", str(root / "f.pt")]
        assert _run([*argv, "--device", "cpu", "--data-dir", str(data)], root) == 2
