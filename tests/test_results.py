"""Results tables: rows upserted atomically, summary.md laid out like the original's table."""

from otfuse.results import read_rows, upsert_row, write_summary


def _row(seeds, method, fused):
    return {"dataset": "digits", "arch": "resnet18", "width": 8, "seeds": seeds, "method": method, "model1": "90.00",
            "model2": "91.00", "ensemble": "93.00", "vanilla": "10.00", "vanilla_bn": "50.00", "fused_no_bn": "20.00", "fused": fused}


def test_rows_are_upserted_and_no_temporary_file_is_left(tmp_path):
    path = tmp_path / "digits_activation.csv"
    upsert_row(path, _row("0-1", "activation", "80.00"))
    upsert_row(path, _row("0-2", "activation", "82.00"))
    upsert_row(path, _row("0-1", "activation", "81.00"))
    rows = read_rows(path)
    assert [(r["seeds"], r["fused"]) for r in rows] == [("0-2", "82.00"), ("0-1", "81.00")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_activation.csv"]


def test_summary_has_the_original_columns_plus_ensemble_and_vanilla(tmp_path):
    upsert_row(tmp_path / "digits_activation.csv", _row("0-1", "activation", "80.00"))
    upsert_row(tmp_path / "digits_weight.csv", _row("0-1", "weight", "70.00"))
    text = write_summary(tmp_path).read_text()
    assert "| Dataset | Model | Pairs | Model1 | Model2 | Activation-base Fusion | Weights-base Fusion | Ensemble | Vanilla | Vanilla + BN |" in text
    assert "| digits | resnet18 w8 | 1 | 90.00 | 91.00 | 80.00 | 70.00 | 93.00 | 10.00 | 50.00 |" in text
