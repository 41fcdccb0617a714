"""otfuse interpolate: the curves meet at the parents, the files are written, bad input is one line."""

from __future__ import annotations

import csv

import pytest

from otfuse.cli import main
from otfuse.interpolate import CURVES, interpolation

from support import config


def test_every_curve_starts_at_model_a_and_the_aligned_ones_end_at_model_b(trained):
    models, data, _, _ = trained
    rows = interpolation(models, data, config(n_images=128, bn_batches=4), points=3)
    at = {(r["alpha"], r["curve"]): r for r in rows}
    assert {r["curve"] for r in rows} == set(CURVES) and sorted({r["alpha"] for r in rows}) == [0.0, 0.5, 1.0]
    for alpha in (0.0, 1.0):
        # alpha 0 is A itself; alpha 1 is B permuted, the same function as B
        assert at[(alpha, "aligned")]["accuracy"] == at[(alpha, "vanilla")]["accuracy"]
        assert at[(alpha, "aligned")]["loss"] == pytest.approx(at[(alpha, "vanilla")]["loss"], rel=1e-4)
        # REPAIR brings back the parent's own statistics, which a 4-batch BatchNorm reset only estimates
        assert abs(at[(alpha, "aligned+repair")]["accuracy"] - at[(alpha, "vanilla")]["accuracy"]) < 1.0
    assert at[(0.5, "aligned")]["accuracy"] > at[(0.5, "vanilla")]["accuracy"]


def test_cli_interpolate_writes_csv_and_png(trained, tmp_path, capsys):
    _, _, paths, root = trained
    code = main(
        [
            "interpolate",
            str(paths[0]),
            str(paths[1]),
            "--points",
            "3",
            "--bn-batches",
            "4",
            "--n-images",
            "128",
            "--results-dir",
            str(tmp_path),
            "--data-dir",
            str(root / "data"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    (csv_path,) = tmp_path.glob("interp-digits-resnet18-w8-seed0-seed1-*.csv")
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 3 * len(CURVES) and set(rows[0]) == {"alpha", "curve", "accuracy", "loss"}
    assert csv_path.with_suffix(".png").stat().st_size > 20_000
    code = main(["interpolate", str(paths[0]), "--results-dir", str(tmp_path), "--data-dir", str(root / "data")])
    assert code == 2 and "exactly two checkpoints" in capsys.readouterr().err
