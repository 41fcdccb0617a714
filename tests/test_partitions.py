"""K parties under a partition of every class's images (`otfuse train --partition iid|classes|dirichlet --parties K
--party i`): the Dirichlet split as Flower Datasets defines it, the parts disjoint and covering, recorded in the
checkpoint and reloaded, one shared initialisation, and K parties fused from the command line."""

from __future__ import annotations

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
from otfuse.subsets import Partition, parts_of, restrict, subset_of
from otfuse.train import TrainConfig, finetune_config, train


def _flower_counts(y: np.ndarray, parties: int, alpha: float, min_size: int, seed: int) -> np.ndarray:
    """[class, party] image counts of Flower Datasets' DirichletPartitioner (self-balancing, its default), written from
    its documented definition: per class in turn a Dirichlet(alpha) draw over the parties, zeroed for parties above the
    average size and renormalised, cut at floor(cumulative share x class count); redrawn until every party holds
    `min_size` images."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    average = len(y) / parties
    while True:
        counts = np.zeros((len(classes), parties), dtype=int)
        for c in classes:
            n = int((y == c).sum())
            p = rng.dirichlet([alpha] * parties)
            p[counts.sum(0) > average] = 0
            cuts = (np.cumsum(p / p.sum()) * n).astype(int)[:-1]
            counts[c] = np.diff(np.concatenate([[0], cuts, [n]]))
        if counts.sum(0).min() >= min_size:
            return counts


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("partitions")
    return root, load_dataset("digits", root / "data")


@pytest.mark.parametrize("alpha,parties,seed", [(0.5, 4, 0), (0.1, 3, 7), (1.0, 8, 1)])
def test_a_dirichlet_partition_is_flower_datasets_one(digits, alpha, parties, seed):
    _, data = digits
    y = data.train_y
    masks = [Partition("dirichlet", parties, i + 1, alpha, 10, seed).mask(y, 0) for i in range(parties)]
    got = np.stack([torch.bincount(y[m], minlength=10).numpy() for m in masks], 1)
    assert (got == _flower_counts(y.numpy(), parties, alpha, 10, seed)).all()  # the same class proportions
    assert bool((torch.stack(masks).sum(0) == 1).all())  # disjoint and covering
    assert got.sum(0).min() >= 10  # the minimum partition size
    # seeded: the same draw again, another seed another draw
    assert torch.equal(masks[0], Partition("dirichlet", parties, 1, alpha, 10, seed).mask(y, 0))
    assert not torch.equal(masks[0], Partition("dirichlet", parties, 1, alpha, 10, seed + 1).mask(y, 0))
    # the validation split, by the same shares: disjoint and covering too
    val = [Partition("dirichlet", parties, i + 1, alpha, 10, seed).mask(data.val_y, 1, y) for i in range(parties)]
    assert bool((torch.stack(val).sum(0) == 1).all())


def test_a_small_alpha_skews_labels_and_a_large_one_does_not(digits):
    _, data = digits
    y = data.train_y

    def top_share(alpha: float) -> float:  # the mean over classes of the largest party's share of the class
        masks = torch.stack([Partition("dirichlet", 4, i + 1, alpha, 0, 3).mask(y, 0) for i in range(4)])
        per_class = torch.stack([masks[:, y == c].float().mean(1) for c in range(10)])
        return float(per_class.max(1).values.mean())

    assert top_share(0.05) > 0.8 and top_share(1000.0) < 0.3


def test_iid_and_class_partitions_cut_every_class_evenly_or_by_blocks(digits):
    _, data = digits
    y = data.train_y
    iid = torch.stack([torch.bincount(y[Partition("iid", 4, i + 1).mask(y, 0)], minlength=10) for i in range(4)])
    assert int((iid.max(0).values - iid.min(0).values).max()) <= 1 and int(iid.sum()) == len(y)
    blocks = [set(y[Partition("classes", 4, i + 1).mask(y, 0)].tolist()) for i in range(4)]
    assert blocks == [{0, 1, 2}, {3, 4}, {5, 6, 7}, {8, 9}]
    assert Partition("classes", 4, 2).classes_of(10) == (3, 4) and Partition("iid", 4, 2).classes_of(10) == tuple(range(10))


def _party(root: Path, party: int, parties: int = 3, seed: int = 0, init_seed: int = -1, **kw) -> Path:
    cfg = TrainConfig(
        dataset="digits",
        width=4,
        epochs=kw.pop("epochs", 2),
        batch_size=32,
        lr=kw.pop("lr", 0.1),
        seed=seed,
        partition="dirichlet",
        parties=parties,
        party=party,
        alpha=0.5,
        init_seed=init_seed,
        device="cpu",
        precision="fp32",
        data_dir=str(root / "data"),
        checkpoint_dir=str(root / "ck"),
        **kw,
    )
    return train(cfg, progress=False)


def _three_parties(root: Path) -> list[Path]:
    """Three Dirichlet(0.5) digits parties of 3 epochs, trained once for the tests that fuse them."""
    folder = root / "ck" / "digits" / "resnet18-w4"
    done = [folder / f"seed0-dirichlet3-a0.5-p{i}.pt" for i in (1, 2, 3)]
    return [p if p.is_file() else _party(root, i, epochs=3) for i, p in zip((1, 2, 3), done)]


def test_a_party_records_its_partition_and_goes_on_with_it(digits):
    root, data = digits
    path = _party(root, 2, epochs=1)
    assert path.name == "seed0-dirichlet3-a0.5-p2.pt"
    meta = load_checkpoint(path)[1]
    part = Partition("dirichlet", 3, 2, 0.5, 10, 0)
    assert subset_of(meta) == part and parts_of(meta) == (part,) and "task_test_acc" not in meta
    seen = restrict(data, part)
    assert torch.equal(seen.train_y, data.train_y[part.mask(data.train_y, 0)]) and len(seen.test_y) == len(data.test_y)
    cfg = finetune_config(meta, path, root / "ft.pt")
    assert (cfg.partition, cfg.parties, cfg.party, cfg.alpha, cfg.min_size) == ("dirichlet", 3, 2, 0.5, 10)


def test_parties_of_one_init_seed_start_from_one_initialisation(digits):
    """The federated norm: every party from the same weights (--init-seed), whatever its own seed; a learning rate
    of 1e-9 keeps the trained weights at their start."""
    root, _ = digits
    start = lambda p: load_checkpoint(p)[0].conv1.weight
    a = _party(root / "init", 1, seed=1, init_seed=5, epochs=1, lr=1e-9)
    b = _party(root / "init", 2, seed=2, init_seed=5, epochs=1, lr=1e-9)
    c = _party(root / "init", 3, seed=3, init_seed=6, epochs=1, lr=1e-9)
    assert a.name == "seed1-dirichlet3-a0.5-p1-i5.pt" and load_checkpoint(a)[1]["config"]["init_seed"] == 5
    assert torch.allclose(start(a), start(b), atol=1e-6) and not torch.allclose(start(a), start(c), atol=1e-3)


@pytest.mark.parametrize(
    "options,why",
    [
        ({"parties": 4}, "--parties 4 belongs to a partition"),
        ({"alpha": 0.1}, "--alpha 0.1 belongs to a partition"),
        ({"partition": "skewed"}, "--partition skewed must be iid or classes or dirichlet"),
        ({"partition": "iid", "parties": 4, "party": 5}, "--party 5 must be from 1 to --parties (4)"),
        ({"partition": "iid", "parties": 1}, "--parties 1 must be from 2"),
        ({"partition": "dirichlet", "alpha": 0.0}, "--alpha 0.0 must be a positive number"),
        ({"partition": "iid", "classes": "0-4"}, "given without --classes"),
        ({"partition": "classes", "parties": 11}, "digits has 10 classes to share out"),
        ({"partition": "dirichlet", "parties": 8, "alpha": 0.01, "min_size": 200}, "after 11 draws; raise --alpha"),
    ],
)
def test_a_bad_partition_is_one_clear_error_before_any_work(tmp_path, options, why):
    cfg = TrainConfig(dataset="digits", width=4, checkpoint_dir=str(tmp_path / "ck"), data_dir=str(tmp_path / "d"), device="cpu")
    for k, v in options.items():
        setattr(cfg, k, v)
    with pytest.raises(OtfuseError, match=why.replace("(", r"\(").replace(")", r"\)")):
        train(cfg, progress=False)
    assert not (tmp_path / "ck").exists()


def test_three_dirichlet_parties_fused_from_the_cli_report_each_party_the_ensemble_and_the_fused_model(digits, capsys):
    root, _ = digits
    paths = _three_parties(root / "three")
    args = ["--device", "cpu", "--precision", "fp32", "--data-dir", str(root / "data"), "--n-images", "200", "--refit-n-images", "200"]
    assert main(["fuse", *map(str, paths), "--baselines", *args]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.startswith("  ") and len(line.split()) == 2}
    assert {"model1", "model2", "model3", "ensemble", "fused"} <= set(rows) and not any("_task" in k for k in rows)
    assert rows["fused"] > 10.0  # above chance: the fusion learnt from all three parties' features


def test_three_parties_fused_within_a_budget_save_a_wider_model_that_evaluates_to_its_reported_accuracy(digits, capsys, tmp_path):
    """`fuse --budget 2`: a model of at most twice one party's FLOPs, wider than a party in the groups kept apart, saved
    with the shapes that rebuild it; `evaluate` reads it back to the accuracy fuse printed; it is refused as a parent."""
    root, _ = digits
    paths = _three_parties(root / "three")
    args = ["--device", "cpu", "--precision", "fp32", "--data-dir", str(root / "data"), "--n-images", "200", "--refit-n-images", "200"]
    out = tmp_path / "budget.pt"
    assert main(["fuse", *map(str, paths), "--budget", "2", "--out", str(out), *args]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert 1.0 < float(rows["FLOPs"][0]) <= 2.0
    model, meta, _ = load_checkpoint(out)
    party = load_checkpoint(paths[0])[0]
    assert meta["shapes"] and sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in party.parameters())
    assert main(["evaluate", str(out), "--device", "cpu", "--precision", "fp32", "--data-dir", str(root / "data")]) == 0
    assert f"accuracy {float(rows['fused'][0]):.2f}%" in capsys.readouterr().out

    def refused(*argv: str) -> str:
        assert main(["fuse", *argv, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        return err

    assert "budgeted fusion" in refused(str(out), str(paths[1]))
    for bad in ("10", "0.5", "nan"):
        assert "give 1 (the full merge) to 9" in refused(*map(str, paths), "--budget", bad)
    assert "leave --width out" in refused(*map(str, paths), "--budget", "2", "--width", "8")


@pytest.mark.slow
def test_run_train_all_trains_every_party_of_a_dirichlet_split(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        **{"SPLIT": "dirichlet", "PARTIES": "2", "ALPHA": "0.5", "INIT": "own", "DATASETS": "digits", "SEEDS": "0"},
        **{"EPOCHS": "1", "WIDTH": "4", "DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    script = tmp_path / "run_train_all.sh"
    script.write_text((root / "run_train_all.sh").read_text())
    script.chmod(0o755)
    for _ in range(2):  # the second run resumes: every party is complete, nothing is trained again
        subprocess.run([str(script)], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    folder = tmp_path / "checkpoint" / "digits" / "resnet18-w4"
    assert sorted(p.name for p in folder.glob("*.pt")) == [f"seed0-dirichlet2-a0.5-p{i}-i{i}.pt" for i in (1, 2)]
