"""bench/bench_finetune.py: every start given the same recipe, one row per epoch (from the start) and split, and a
stopped sweep resumes without redoing a run."""

from __future__ import annotations

import csv

from otfuse.cli import main as otfuse_main

from support import bench_module


def test_bench_finetune_writes_each_starts_curve_and_resumes(trained, tmp_path):
    _, _, paths, root = trained
    base = ["--data-dir", str(root / "data"), "--device", "cpu"]
    fused = tmp_path / "fused.pt"
    assert otfuse_main(["fuse", str(paths[0]), str(paths[1]), "--bn-batches", "4", "--out", str(fused), *base]) == 0
    args = [
        str(fused),
        str(paths[0]),
        str(paths[1]),
        "--run",
        "fused,transplant: epochs=1 batch_size=64 precision=fp32",
        "--out-dir",
        str(tmp_path),
        *base,
    ]
    bench = bench_module("bench_finetune")
    assert bench.main(args) == 0
    out = tmp_path / "finetune-digits-w8.csv"
    rows = list(csv.DictReader(out.open(newline="")))
    for start in ("fused", "transplant"):
        got = [(r["epoch"], r["split"]) for r in rows if r["start"] == start]
        assert got == [("0", "val"), ("1", "val"), ("1", "test")], start
        assert all(0 <= float(r["acc"]) <= 100 for r in rows if r["start"] == start)
    written = out.read_text()
    assert bench.main(args) == 0  # every run's rows are there: nothing is run again
    assert out.read_text() == written


def test_bench_finetune_makes_narrower_starts_of_any_width(trained, tmp_path, capsys):
    _, _, paths, root = trained
    base = ["--data-dir", str(root / "data"), "--device", "cpu"]
    fused = tmp_path / "fused.pt"
    assert otfuse_main(["fuse", str(paths[0]), str(paths[1]), "--bn-batches", "4", "--out", str(fused), *base]) == 0
    starts = ("fused-w4", "pruned-w4", "fused-pruned-w4", "transplant-w4", "scratch-w4")
    common = [str(fused), str(paths[0]), str(paths[1]), "--out-dir", str(tmp_path), *base]
    bench = bench_module("bench_finetune")
    assert bench.main([*common, "--run", f"{','.join(starts)}: epochs=1 batch_size=64 precision=fp32"]) == 0
    rows = list(csv.DictReader((tmp_path / "finetune-digits-w8.csv").open(newline="")))
    for start in starts:
        got = [(r["epoch"], r["split"]) for r in rows if r["start"] == start]
        assert got == [("0", "val"), ("1", "val"), ("1", "test")], start
        # above chance after one epoch: each start is a working width-4 model
        assert float(next(r["acc"] for r in rows if r["start"] == start and r["split"] == "test")) > 20, start
    for bad in ("pruned-w8", "narrow-w4"):
        assert bench.main([*common, "--run", f"{bad}: epochs=1"]) == 2
        assert bad in capsys.readouterr().err
