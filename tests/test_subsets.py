"""Parties that train on parts of a dataset: class subsets and biased samples, recorded in the checkpoint, split
exactly between complementary parties, and fused on the union of what they saw (or one party's part)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from otfuse.checkpoints import load_checkpoint
from otfuse.cli import main
from otfuse.data import load_dataset
from otfuse.errors import OtfuseError
from otfuse.inputs import fusion_inputs
from otfuse.precision import Precision
from otfuse.subsets import Subset, complement, format_classes, fusion_mask, mask, parse_classes, restrict, subset_of
from otfuse.train import TrainConfig, finetune_config, train


def test_classes_are_ranges_and_lists_and_bad_ones_are_one_clear_error():
    assert parse_classes("0-4", 10) == (0, 1, 2, 3, 4) and parse_classes("7, 0,2-3", 10) == (0, 2, 3, 7)
    assert format_classes((0, 1, 2, 5, 7, 8)) == "0-2,5,7-8"
    for bad, why in (
        ("0-10", "within the dataset's labels 0-9"),
        ("a-b", "label indices and ranges"),
        ("3-1", "not a range"),
        ("0-9", "lists every class"),
    ):
        with pytest.raises(OtfuseError, match=why):
            parse_classes(bad, 10)


@pytest.mark.parametrize("bias", [1.0, 0.8, 0.5])
def test_complementary_parties_split_every_split_exactly(bias):
    y = torch.arange(10).repeat_interleave(97)[torch.randperm(970, generator=torch.Generator().manual_seed(0))]
    a = Subset(parse_classes("0-4", 10), bias, seed=3)
    b = complement(a, 10)
    for salt in (0, 1):
        in_a, in_b = mask(y, a, salt), mask(y, b, salt)
        assert not bool((in_a & in_b).any()) and bool((in_a | in_b).all())  # nothing shared, nothing left over
        for c in range(10):  # each listed class gives the bias's share of its images, each other class the rest
            share = float(in_a[y == c].float().mean())
            assert share == pytest.approx(bias if c < 5 else 1 - bias, abs=1 / 97)
    assert torch.equal(mask(y, a, 0), mask(y, Subset(a.classes, bias, seed=3), 0))  # the seed fixes the draw
    assert bias == 1.0 or not torch.equal(mask(y, a, 0), mask(y, Subset(a.classes, bias, seed=4), 0))


def _party(root, seed: int, classes: str, bias: float = 1.0, epochs: int = 2):
    cfg = TrainConfig(
        dataset="digits",
        width=4,
        epochs=epochs,
        batch_size=64,
        lr=0.1,
        seed=seed,
        classes=classes,
        bias=bias,
        device="cpu",
        precision="fp32",
        data_dir=str(root / "data"),
        checkpoint_dir=str(root / "ck"),
    )
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def parties(tmp_path_factory):
    root = tmp_path_factory.mktemp("parties")
    return root, [_party(root, 0, "0-4"), _party(root, 1, "5-9"), _party(root, 2, "0-4", 0.8), _party(root, 3, "5-9", 0.8)]


def test_a_class_split_and_a_biased_split_are_recorded_and_reload(parties):
    root, (a, b, biased, _) = parties
    assert a.name == "seed0-c0-4.pt" and biased.name == "seed2-c0-4-b0.8.pt"
    data = load_dataset("digits", root / "data")
    for path, part in (
        (a, Subset((0, 1, 2, 3, 4), 1.0, 0)),
        (b, Subset((5, 6, 7, 8, 9), 1.0, 0)),
        (biased, Subset((0, 1, 2, 3, 4), 0.8, 0)),
    ):
        model, meta, _ = load_checkpoint(path)
        assert subset_of(meta) == part and meta["num_classes"] == 10 and model.fc.out_features == 10  # the head covers every class
        assert meta["val_size"] == len(data.val_y)  # the dataset's split, as every party holds it out
        assert 0 <= meta["task_test_acc"] <= 100
        # a fine-tune of a party goes on with its part; the validation split followed it
        cfg = finetune_config(meta, path, root / "ft.pt")
        assert (cfg.classes, cfg.bias, cfg.split_seed) == (format_classes(part.classes), part.bias, 0)
    seen = restrict(data, subset_of(load_checkpoint(a)[1]))
    assert (
        set(seen.train_y.tolist()) == set(range(5)) and set(seen.val_y.tolist()) == set(range(5)) and len(seen.test_y) == len(data.test_y)
    )


def test_a_bias_without_classes_or_a_bad_bias_is_refused_before_any_work(tmp_path):
    for kw, why in (({"bias": 0.8}, "give --classes too"), ({"classes": "0-4", "bias": 1.5}, "at most 1")):
        with pytest.raises(OtfuseError, match=why):
            train(TrainConfig(dataset="digits", checkpoint_dir=str(tmp_path / "ck"), data_dir=str(tmp_path / "d"), **kw))
    assert not (tmp_path / "ck").exists()


def test_split_parents_fuse_on_their_union_or_one_partys_images(parties):
    root, (a, b, biased, biased_b) = parties
    data_dir = root / "data"
    whole = load_dataset("digits", data_dir)
    union = fusion_inputs([a, b], {"precision": "fp32"}, data_dir=data_dir, device="cpu")
    assert union.tasks == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)] and torch.equal(union.data.train_y, whole.train_y)
    own = fusion_inputs([a, b], {"precision": "fp32", "fusion_data": "model1"}, data_dir=data_dir, device="cpu")
    assert set(own.data.train_y.tolist()) == set(range(5)) and len(own.data.test_y) == len(whole.test_y)
    few = fusion_inputs([a, b], {"precision": "fp32", "fusion_data": "3-per-class"}, data_dir=data_dir, device="cpu")
    assert torch.bincount(few.data.train_y).tolist() == [3] * 10
    # a biased party's own images: 80% of its classes' and 20% of the others'; the pair's union is every image
    mine = fusion_mask(whole.train_y, [subset_of(load_checkpoint(p)[1]) for p in (biased, biased_b)], "model1")
    assert 0.7 < float(mine[whole.train_y < 5].float().mean()) < 0.9 and 0.1 < float(mine[whole.train_y >= 5].float().mean()) < 0.3
    with pytest.raises(OtfuseError, match="give model1 to model2"):
        fusion_inputs([a, b], {"fusion_data": "model3"}, data_dir=data_dir, device="cpu")


def test_split_parents_fused_from_the_cli_report_joint_and_per_task_accuracy(parties, capsys):
    root, (a, b, _, _) = parties
    assert (
        main(
            [
                "fuse",
                str(a),
                str(b),
                "--baselines",
                "--precision",
                "fp32",
                "--data-dir",
                str(root / "data"),
                "--device",
                "cpu",
                "--n-images",
                "200",
                "--refit-n-images",
                "200",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for column in ("model1", "model2", "ensemble", "vanilla_refit", "fused_average", "fused_repair", "fused"):
        for k in ("", "_task1", "_task2"):
            assert f"  {column}{k} " in out, f"{column}{k} missing"


@pytest.mark.slow
def test_run_train_all_trains_parties_and_the_fusion_script_fuses_complementary_ones(tmp_path, monkeypatch, capsys):
    """SPLIT=disjoint trains party A (classes 0-4) and B (5-9) per seed; run_activation_based_fusion.py fuses A of one
    seed with B of the other and writes results/split-digits.csv and the summary's parties table."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "SPLIT": "disjoint",
        "DATASETS": "digits",
        "SEEDS": "0 1",
        "EPOCHS": "1",
        "WIDTH": "4",
        "DATA_DIR": str(tmp_path / "data"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    # run_train_all.sh works in its own folder: a copy of it here keeps the checkpoints here
    script = tmp_path / "run_train_all.sh"
    script.write_text((root / "run_train_all.sh").read_text())
    script.chmod(0o755)
    subprocess.run([str(script)], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    folder = tmp_path / "checkpoint" / "digits" / "resnet18-w4"
    assert sorted(p.name for p in folder.glob("*.pt")) == ["seed0-c0-4.pt", "seed0-c5-9.pt", "seed1-c0-4.pt", "seed1-c5-9.pt"]
    # the script is `otfuse.sweep.main` (run_activation_based_fusion.py is its two-line wrapper): in this process, in
    # the folder the checkpoints are in, without the 8 s a new process takes to import the fusion stack
    from otfuse.sweep import main as sweep_main

    monkeypatch.chdir(tmp_path)
    argv = ["--data-dir", str(tmp_path / "data"), "--device", "cpu", "--precision", "fp32", "--n-images", "100", "--refit-n-images", "100"]
    assert sweep_main(argv, "activation") == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "results" / "split-digits.csv")))
    assert sorted((r["seeds"], r["parts"]) for r in rows) == [("0-1", "c0-4+c5-9"), ("1-0", "c0-4+c5-9")]
    assert all(r["fused_task1"] and r["ensemble_task2"] and r["fusion_data"] == "union" for r in rows)
    assert not (tmp_path / "results" / "digits_activation.csv").exists()
    assert "## Parents trained on parts of the data" in out and "| digits | resnet18 w4 | c0-4+c5-9 | union | activation | 2 |" in out


def test_a_partial_merge_spans_the_ensemble_and_the_full_merge(parties):
    """Cut after the last layer: the fused model; before the first: the mean of the parents' logits; between: a stem
    and one branch per parent, more parameters than one model and fewer than two."""
    from otfuse.evaluate import logits
    from otfuse.fusion import fuse
    from otfuse.partial import INPUT, cost, cut_points, partial_merge, split_graph

    root, (a, b, _, _) = parties
    inputs = fusion_inputs([a, b], {"precision": "fp32", "n_images": 200, "refit_n_images": 200}, data_dir=root / "data", device="cpu")
    data = inputs.data
    fusion = fuse(inputs.models, data.train_x, data.norm, inputs.cfg)
    x = data.test_x[:64]
    cuts = cut_points(fusion.fused)
    assert cuts[0] == INPUT and cuts[-1] == "fc" and {"bn1", "layer1.0", "layer2.1", "layer3.0", "layer4.1"} <= set(cuts)
    full = partial_merge(fusion, "fc", data.train_x, data.norm)
    assert torch.allclose(logits(full, x, data.norm, Precision.FP32), logits(fusion.fused, x, data.norm, Precision.FP32), atol=1e-5)
    none = partial_merge(fusion, INPUT, data.train_x, data.norm)
    mean = sum(logits(m, x, data.norm, Precision.FP32) for m in inputs.models) / 2
    assert torch.allclose(logits(none, x, data.norm, Precision.FP32), mean, atol=1e-4)
    half = partial_merge(fusion, "layer3.0", data.train_x, data.norm)
    one, both = cost(inputs.models[0], x[:1].float()), cost(half, x[:1].float())
    assert one["params"] < both["params"] < 2 * one["params"] and one["flops"] < both["flops"] < 2 * one["flops"]
    with pytest.raises(OtfuseError, match="crosses the cut"):  # inside a block the shortcut's input crosses too
        split_graph(fusion.fused, "layer2.0.bn1")
    with pytest.raises(OtfuseError, match="no module of that name"):
        split_graph(fusion.fused, "layer9")


def test_a_model_of_parties_learns_only_from_their_union_through_fusion_finetuning_and_evaluation(tmp_path, capsys):
    """A fused model of parties records the union of their parts: fusing it again, fine-tuning it and validating it
    read only the images some party held (before, its metadata dropped the parts and it counted as trained on all)."""
    a, b = _party(tmp_path, 0, "0-2", epochs=1), _party(tmp_path, 1, "3-5", epochs=1)
    data_dir, fused = tmp_path / "data", tmp_path / "f.pt"
    args = ["--precision", "fp32", "--data-dir", str(data_dir), "--device", "cpu", "--n-images", "100", "--refit-n-images", "100"]
    assert main(["fuse", str(a), str(b), "--out", str(fused), *args]) == 0
    meta = load_checkpoint(fused)[1]
    assert meta["parts"] == [Subset((0, 1, 2), 1.0, 0).to_meta(), Subset((3, 4, 5), 1.0, 0).to_meta()] and "subset" not in meta
    again = fusion_inputs([fused, a], {"precision": "fp32"}, data_dir=data_dir, device="cpu")
    assert set(again.data.train_y.tolist()) == set(range(6)) == set(again.data.val_y.tolist())
    assert again.tasks == [(0, 1, 2, 3, 4, 5), (0, 1, 2)]
    cfg = finetune_config(meta, fused, tmp_path / "ft.pt", epochs=1, device="cpu", precision="fp32", data_dir=str(data_dir))
    assert cfg.classes == "" and len(json.loads(cfg.parts)) == 2
    ft = load_checkpoint(train(cfg, progress=False))[1]
    assert ft["parts"] == meta["parts"] and 0 <= ft["task_test_acc"] <= 100
    whole = load_dataset("digits", data_dir)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ft.pt"), "--split", "val", "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    assert f", {int((whole.val_y < 6).sum())} images)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # never typed: only a checkpoint sets it
        main(["train", "--dataset", "digits", "--parts", "[]"])


def test_run_train_all_with_a_split_and_a_bad_dataset_is_one_line(tmp_path):
    """The script counts the dataset's classes to split them: a bad name or a path that does not exist (a path with a
    space, split by the shell) was a traceback; it is otfuse's one line and exit code 2."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SPLIT": "disjoint", "EPOCHS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = tmp_path / "run_train_all.sh"
    script.write_text((root / "run_train_all.sh").read_text())
    script.chmod(0o755)
    for datasets, why in (("cifar11", "unknown dataset 'cifar11'"), (f"imagefolder:{tmp_path}/my data", "does not exist")):
        run = subprocess.run([str(script)], cwd=tmp_path, env={**env, "DATASETS": datasets}, capture_output=True, text=True)
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and why in run.stderr, run.stderr


def test_parties_fuse_on_a_public_dataset_no_party_trained_on(parties, tmp_path, capsys):
    """--fusion-data public:<dataset>: a fuser that holds none of the parties' images reads another dataset's (as
    FedDF's server does), turned into the parties' channels and size; the parties' own dataset is refused."""
    from PIL import Image

    from otfuse.data import converted

    root, (a, b, _, _) = parties
    public = tmp_path / "public"
    g = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("x", "y"):
            (public / split / c).mkdir(parents=True)
            for i in range(30):
                Image.fromarray(g.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(public / split / c / f"{i}.png")
    spec = f"public:imagefolder:{public}"
    inputs = fusion_inputs([a, b], {"precision": "fp32", "fusion_data": spec}, data_dir=root / "data", device="cpu")
    whole = load_dataset("digits", root / "data")
    assert inputs.data.train_x.shape[1:] == whole.train_x.shape[1:] and len(inputs.data.train_x) == 54  # 60 less 10% held out
    assert torch.equal(inputs.data.test_y, whole.test_y) and inputs.class_counts.sum() == len(whole.train_y)
    args = ["--precision", "fp32", "--data-dir", str(root / "data"), "--device", "cpu", "--n-images", "50", "--refit-n-images", "50"]
    assert main(["fuse", str(a), str(b), "--fusion-data", spec, *args]) == 0
    assert "fused " in capsys.readouterr().out
    with pytest.raises(OtfuseError, match="is the parents' own dataset; give --fusion-data union"):
        fusion_inputs([a, b], {"fusion_data": "public:digits"}, data_dir=root / "data", device="cpu")
    grey = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(converted(converted(grey, 3, (8, 8)), 1, (8, 8)), grey)  # grey to colour and back
    flat = torch.full((2, 3, 12, 12), 77, dtype=torch.uint8)
    assert torch.equal(converted(flat, 3, (8, 8)), torch.full((2, 3, 8, 8), 77, dtype=torch.uint8))
