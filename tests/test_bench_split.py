"""bench/bench_split.py on digits: parties trained, fused on the union and on one party's images, a row each, the
partial merges' curve written, and a rerun that finds every row done changes nothing."""

from __future__ import annotations

import csv

import pytest

from support import bench_module


@pytest.mark.slow
def test_bench_split_trains_parties_fuses_them_and_resumes(tmp_path, monkeypatch):
    bench = bench_module("bench_split")
    monkeypatch.setitem(bench.SETTINGS, "digits-5+5", bench.Setting("digits", 4, 2, "disjoint"))
    args = [
        "--settings",
        "digits-5+5",
        "--partial",
        "digits-5+5",
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--results-dir",
        str(tmp_path / "res"),
        "--out-dir",
        str(tmp_path),
        "--data-dir",
        str(tmp_path / "data"),
        "--device",
        "cpu",
    ]
    assert bench.main(args) == 0
    out = tmp_path / "split-digits-w4.csv"
    rows = list(csv.DictReader(out.open()))
    assert [(r["method"], r["fusion_data"]) for r in rows] == bench.RUNS
    assert {r["distill_epochs"] for r in rows} == {"1"}  # parties of different data: the default distils them
    for r in rows:
        assert all(
            r[f"{c}{t}"]
            for c in ("model1", "ensemble", "vanilla_refit", "fused_average", "fused_repair", "fused")
            for t in ("", "_task1", "_task2")
        )
    partial = list(csv.DictReader((tmp_path / "res" / "partial-digits.csv").open()))
    cuts = bench.CUTS.split(",")  # --cuts as given (its default): read, not ignored
    assert [r["cut"] for r in partial] == cuts
    assert (tmp_path / "res" / "partial-digits.png").stat().st_size > 0
    before, curve = out.read_bytes(), (tmp_path / "res" / "partial-digits.csv").read_bytes()
    monkeypatch.setattr(bench, "fusion_table", None)  # the rerun: parties finished, every row and cut there, nothing fused
    assert bench.main(args) == 0 and out.read_bytes() == before and (tmp_path / "res" / "partial-digits.csv").read_bytes() == curve
