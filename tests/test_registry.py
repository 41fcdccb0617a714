"""A method registered in one place is offered everywhere: otfuse fuse, the fusion scripts, summary.md and tune."""

from __future__ import annotations

import json

import pytest
import torch

from otfuse.align import METHODS, register_method
from otfuse.cli import main
from otfuse.maps import ChannelMap
from otfuse.results import read_rows
from otfuse.sweep import main as sweep_main


@pytest.fixture
def toy():
    """A toy method that keeps every channel where it is (vanilla averaging through the pipeline)."""

    @register_method("toy-identity", "Toy identity fusion", needs_images=False)
    def identity(anchor, source, anchor_groups, source_groups, cfg, images=None, norm=None, progress=False):
        return {g.name: ChannelMap.identity(g.size) for g in anchor_groups}

    yield "toy-identity"
    del METHODS["toy-identity"]


def test_a_registered_method_is_offered_by_fuse(toy, trained, tmp_path, capsys):
    _, _, paths, root = trained
    with pytest.raises(SystemExit):
        main(["fuse", "--help"])
    assert toy in capsys.readouterr().out
    out = tmp_path / "fused.pt"
    code = main(
        [
            "fuse",
            str(paths[0]),
            str(paths[1]),
            "--method",
            toy,
            "--bn-batches",
            "4",
            "--no-refit",
            "--out",
            str(out),
            "--data-dir",
            str(root / "data"),
            "--device",
            "cpu",
            "--baselines",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and f"method {toy}" in text
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["method"] == toy
    # identity maps: the fusion before BatchNorm is the vanilla average
    fused = [line for line in text.splitlines() if line.split()[:1] in (["fused_no_bn"], ["vanilla"])]
    assert len(fused) == 2 and fused[0].split()[1] == fused[1].split()[1]


@pytest.mark.slow
def test_a_registered_method_reaches_the_scripts_summary_and_tune(toy, trained, tmp_path, capsys):
    _, _, paths, root = trained
    results = tmp_path / "results"
    code = sweep_main(
        [
            "--checkpoint-dir",
            str(root / "ck"),
            "--results-dir",
            str(results),
            "--data-dir",
            str(root / "data"),
            "--device",
            "cpu",
            "--method",
            toy,
            "--bn-batches",
            "4",
            "--no-refit",
        ],
        "activation",
    )
    assert code == 0, capsys.readouterr().err
    assert read_rows(results / f"digits_{toy}.csv")[0]["method"] == toy
    assert "Toy identity fusion" in (results / "summary.md").read_text()
    code = main(
        [
            "tune",
            str(paths[0]),
            str(paths[1]),
            "--methods",
            toy,
            "--n-trials",
            "2",
            "--results-dir",
            str(results),
            "--data-dir",
            str(root / "data"),
            "--device",
            "cpu",
            "--bn-batches",
            "4",
        ]
    )
    assert code == 0, capsys.readouterr().err
    best = json.loads(next(results.glob("tune-*-best.json")).read_text())
    assert best["method"] == toy
