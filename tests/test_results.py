"""Results tables: rows upserted atomically, summary.md laid out like the original's table."""

import pytest

from otfuse.checkpoints import load_checkpoint
from otfuse.errors import OtfuseError
from otfuse.results import read_rows, upsert_row, upsert_rows, write_summary
from otfuse.sweep import main


def _row(seeds, method, fused):
    return {
        "dataset": "digits",
        "arch": "resnet18",
        "width": 8,
        "seeds": seeds,
        "method": method,
        "model1": "90.00",
        "model2": "91.00",
        "ensemble": "93.00",
        "vanilla": "10.00",
        "vanilla_bn": "50.00",
        "fused_no_bn": "20.00",
        "fused": fused,
    }


def test_rows_are_upserted_and_no_temporary_file_is_left(tmp_path):
    path = tmp_path / "digits_activation.csv"
    upsert_row(path, _row("0-1", "activation", "80.00"))
    upsert_row(path, _row("0-2", "activation", "82.00"))
    upsert_row(path, _row("0-1", "activation", "81.00"))
    rows = read_rows(path)
    assert [(r["seeds"], r["fused"]) for r in rows] == [("0-2", "82.00"), ("0-1", "81.00")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_activation.csv"]


def test_a_key_of_zero_is_a_key_not_a_blank(tmp_path):
    """Round 0 of a federated run, written twice, is one row (0 once read as a missing key)."""
    path = tmp_path / "rounds.csv"
    upsert_rows(path, [{"run": "a", "round": 0, "acc": 10.0}, {"run": "a", "round": 1, "acc": 40.0}], ("run", "round"))
    upsert_rows(path, [{"run": "a", "round": 0, "acc": 11.0}], ("run", "round"))
    assert [(r["round"], r["acc"]) for r in read_rows(path)] == [("1", "40.0"), ("0", "11.0")]


def test_summary_has_the_original_columns_plus_ensemble_and_vanilla(tmp_path):
    upsert_row(tmp_path / "digits_activation.csv", _row("0-1", "activation", "80.00"))
    upsert_row(tmp_path / "digits_weight.csv", _row("0-1", "weight", "70.00"))
    text = write_summary(tmp_path).read_text()
    assert (
        "| Dataset | Model | Pairs | Model1 | Model2 | Activation-base Fusion | Weights-base Fusion | Ensemble | Vanilla | Vanilla + BN |"
        in text
    )
    assert "| digits | resnet18 w8 | 1 | 90.00 | 91.00 | 80.00 | 70.00 | 93.00 | 10.00 | 50.00 |" in text


def test_the_summary_skips_csvs_of_someone_elses_with_a_warning(tmp_path):
    """A Latin-1 CSV, or one of other columns, that matches the fusion scripts' names (`*_*.csv`, `split-*.csv`) broke
    the summary after the work was done; each is skipped with a warning, and an own file of that kind is one line."""
    upsert_row(tmp_path / "digits_activation.csv", _row("0-1", "activation", "80.00"))
    (tmp_path / "notes_2024.csv").write_bytes("name,café\nJosé,1\n".encode("latin-1"))
    (tmp_path / "my_runs.csv").write_text("fused,method\nyes,mine\n")  # other columns: not a fusion row
    (tmp_path / "split-mine.csv").write_text("dataset,arch,width,parts,fusion_data,method,fused,ensemble\nd,a,1,p,u,m,x,y\n")
    with pytest.warns(UserWarning, match="notes_2024.csv is not a CSV otfuse writes"):
        text = write_summary(tmp_path).read_text()
    assert "| digits | resnet18 w8 | 1 | 90.00 | 91.00 | 80.00 |" in text and "mine" not in text.split("## Parents")[0]
    with pytest.raises(OtfuseError, match="notes_2024.csv is not a CSV otfuse writes"):
        upsert_row(tmp_path / "notes_2024.csv", _row("0-1", "activation", "80.00"))


def test_summary_gains_repair_and_finetuning_columns_when_runs_have_them(tmp_path):
    upsert_row(
        tmp_path / "digits_activation.csv",
        {**_row("0-1", "activation", "80.00"), "fused_repair": "81.00", "fused_ft": "92.00", "finetune_epochs": "1"},
    )
    upsert_row(tmp_path / "digits_weight.csv", {**_row("0-1", "weight", "70.00"), "fused_repair": "72.00"})
    text = write_summary(tmp_path).read_text()
    assert (
        "| Activation-base Fusion | Weights-base Fusion | Activation + REPAIR | Weights + REPAIR "
        "| Activation + 1 ep fine-tuning | Ensemble |"
    ) in text
    assert "| 80.00 | 70.00 | 81.00 | 72.00 | 92.00 | 93.00 |" in text


@pytest.mark.slow
def test_the_fusion_script_writes_repair_and_finetuned_columns(trained, tmp_path, capsys):
    _, _, paths, root = trained
    code = main(
        [
            "--checkpoint-dir",
            str(root / "ck"),
            "--results-dir",
            str(tmp_path),
            "--data-dir",
            str(root / "data"),
            "--device",
            "cpu",
            "--bn-batches",
            "4",
            "--n-images",
            "128",
            "--finetune-epochs",
            "1",
            "--finetune-distill",
        ],
        "activation",
    )
    assert code == 0, capsys.readouterr().err
    row = read_rows(tmp_path / "digits_activation.csv")[0]
    assert row["finetune_epochs"] == "1" and row["fused_repair"]
    folder = root / "ck" / "digits" / "resnet18-w8"
    for column, name in (
        ("fused_ft", "fused-activation-seeds0-1-ft1.pt"),
        ("fused_ft_distill", "fused-activation-seeds0-1-ft1-distill.pt"),
    ):
        meta = load_checkpoint(folder / name)[1]
        # the column is the fine-tuned checkpoint's test accuracy, and a fine-tune never ends below its start on validation
        assert f"{meta['test_acc']:.2f}" == f"{float(row[column]):.2f}"
        assert meta["val_acc"] >= meta["start_val_acc"]
        if meta["kept_start"]:
            assert f"{meta['test_acc']:.2f}" == f"{float(row['fused']):.2f}"
    # the curves: every start given the same epoch, plain and distilled, from its start (epoch 0), beside the ensemble
    curves = read_rows(tmp_path / "finetune-digits.csv")
    runs = {(r["start"], r["recipe"]) for r in curves if r["start"] != "ensemble"}
    assert runs == {(s, d) for s in ("fused", "seed0", "seed1", "vanilla") for d in ("default", "distill")}
    for start, recipe in runs:
        run = [r for r in curves if (r["start"], r["recipe"]) == (start, recipe)]
        assert {(r["epoch"], r["split"]) for r in run} == {("0", "val"), ("1", "val"), ("1", "test")}
        # every start ran the fused model's recipe, as it ran
        assert {r["options"] for r in run} == {r["options"] for r in curves if (r["start"], r["recipe"]) == ("fused", recipe)}
    fused_start = next(float(r["acc"]) for r in curves if (r["start"], r["epoch"], r["split"]) == ("fused", "0", "val"))
    assert fused_start == pytest.approx(load_checkpoint(folder / "fused-activation-seeds0-1-ft1.pt")[1]["start_val_acc"], abs=0.01)
    assert [r["split"] for r in curves if r["start"] == "ensemble"] == ["val"]
    assert (tmp_path / "finetune-digits.png").read_bytes()[:4] == b"\x89PNG"
    summary = (tmp_path / "summary.md").read_text()
    assert "Activation + 1 ep fine-tuning" in summary and "Activation + 1 ep distillation" in summary


def test_the_scripts_never_replace_a_summary_or_plot_they_did_not_write(trained, tmp_path, capsys):
    """DAMAGE: results/summary.md and results/partial-<dataset>.png were replaced whatever they held; now a file
    there that no fusion script wrote stops the run before any work, in one line, and is kept."""
    from otfuse.plots import is_own_figure, pyplot, save_figure
    from otfuse.results import is_own_summary

    _, _, _, root = trained
    summary = tmp_path / "summary.md"
    summary.write_text("# My notes on the runs\n\nhand-written\n")
    base = ["--checkpoint-dir", str(root / "ck"), "--results-dir", str(tmp_path), "--data-dir", str(root / "data"), "--device", "cpu"]
    assert main(base, "activation") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the summary" in err and "move it away, or give another --results-dir" in err
    assert summary.read_text() == "# My notes on the runs\n\nhand-written\n" and not list(tmp_path.glob("*.csv"))
    summary.unlink()
    fig, _ = pyplot().subplots()
    save_figure(fig, tmp_path / "mine.png")  # otfuse's own figure: recognised
    fig, _ = pyplot().subplots()
    fig.savefig(tmp_path / "partial-digits.png")  # a user's plot at the name the partial merges write
    pyplot().close(fig)
    assert is_own_figure(tmp_path / "mine.png") and not is_own_figure(tmp_path / "partial-digits.png")
    before = (tmp_path / "partial-digits.png").read_bytes()
    assert main([*base, "--merge-until", "layer1"], "activation") == 2
    assert "the plot partial-digits.png" in capsys.readouterr().err and (tmp_path / "partial-digits.png").read_bytes() == before
    upsert_row(tmp_path / "digits_activation.csv", _row("0-1", "activation", "80.00"))
    assert is_own_summary(write_summary(tmp_path))
    old = "# Fusion results\n\nTest accuracy (%), mean over the fused pairs. A method's ...\n"  # written before the mark
    (tmp_path / "old.md").write_text(old)
    assert is_own_summary(tmp_path / "old.md") and not is_own_summary(tmp_path / "partial-digits.png")
