"""bench/bench_many.py: k = 2 .. n parents fused into one beside the ensemble of the same k, a row per k, a plot, and
a rerun that finds every row done changes nothing."""

from __future__ import annotations

import csv

import pytest

from otfuse.train import TrainConfig, train

from support import bench_module


@pytest.mark.slow
def test_bench_many_fuses_two_and_three_parents_and_resumes(trained, tmp_path):
    _, _, paths, root = trained
    third = train(
        TrainConfig(
            dataset="digits",
            width=8,
            epochs=8,
            batch_size=64,
            lr=0.1,
            seed=2,
            device="cpu",
            precision="fp32",
            data_dir=str(root / "data"),
            out=str(tmp_path / "seed2.pt"),
        ),
        progress=False,
    )
    args = [
        *map(str, paths),
        str(third),
        "--data-dir",
        str(root / "data"),
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path),
        "--results-dir",
        str(tmp_path / "res"),
    ]
    bench = bench_module("bench_many")
    assert bench.main(args) == 0
    out = tmp_path / "many-digits-w8.csv"
    rows = list(csv.DictReader(out.open()))
    assert [(r["k"], r["seeds"]) for r in rows] == [("2", "0-1"), ("3", "0-1-2")]
    for r in rows:
        parents = [float(a) for a in r["parents"].split(" / ")]
        assert len(parents) == int(r["k"]) and abs(float(r["parent_mean"]) - sum(parents) / len(parents)) < 0.01
        assert abs(float(r["fused"]) - float(r["ensemble"]) - float(r["fused_minus_ensemble"])) < 0.011
    assert (tmp_path / "res" / "many-digits-w8.png").stat().st_size > 0
    before = out.read_bytes()
    assert bench.main(args) == 0 and out.read_bytes() == before
