"""bench/bench_parties.py on digits: K parties of a Dirichlet partition trained from one start, fused with each
variant, a row each with every party, the best party, the ensembles and the fusion, and a rerun that finds every row
done changes nothing (or fills in `ensemble_counts` where a row from before that column lacks it)."""

from __future__ import annotations

import csv

import pytest

from support import bench_module


@pytest.mark.slow
def test_bench_parties_trains_k_parties_fuses_them_and_resumes(tmp_path, monkeypatch):
    bench = bench_module("bench_parties")
    monkeypatch.setitem(bench.SETTINGS, "digits-dir0.5-k3-shared", bench.Setting("digits", 4, 3, 0.5, "shared", epochs=2))
    args = ["--settings", "digits-dir0.5-k3-shared", "--variants", "default,head-counts", "--checkpoint-dir", str(tmp_path / "ck")]
    args += ["--out-dir", str(tmp_path), "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    assert bench.main(args) == 0
    out = tmp_path / "parties-digits-w4.csv"
    rows = list(csv.DictReader(out.open()))
    assert [(r["variant"], r["split"]) for r in rows] == [("default", "val"), ("head-counts", "val")]
    for r in rows:
        parties = [float(r[f"party{i}"]) for i in (1, 2, 3)]
        assert float(r["best_party"]) == max(parties) and all(r[k] for k in ("ensemble", "ensemble_counts", "fused"))
        assert all(r[k] for k in ("vanilla_bn", "vanilla_refit", "fused_average")) == (r["variant"] == "default")
        assert float(r["fused_minus_best"]) == pytest.approx(float(r["fused"]) - max(parties), abs=0.011)
    assert sorted(p.name for p in (tmp_path / "ck" / "digits-dir0.5-k3-shared").glob("*.pt")) == ["party1.pt", "party2.pt", "party3.pt"]
    before = out.read_bytes()
    assert bench.main(args) == 0 and out.read_bytes() == before  # the rerun: parties finished, every row already there
    with out.open("w", newline="") as f:  # rows measured before the column existed
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "ensemble_counts": ""} for r in rows])
    assert bench.main(args) == 0
    assert [r["ensemble_counts"] for r in csv.DictReader(out.open())] == [r["ensemble_counts"] for r in rows]
