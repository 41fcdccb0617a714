"""Outputs: an existing file is replaced only when it is the command's own earlier result for the same
inputs (or with --overwrite); results are named by what their inputs are; two processes writing one
output cannot both succeed; a full disk leaves nothing behind. Legitimate outcomes of the hostile
inputs of the second round (the refusals are in tests/test_bad_inputs.py)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import otfuse.storage as S
from otfuse.checkpoints import load_checkpoint
from otfuse.cli import main
from otfuse.data import load_dataset
from otfuse.errors import OtfuseError
from otfuse.fusion import FuseConfig


def _fuse(a, b, out, data, *extra) -> int:
    return main(
        [
            "fuse",
            str(a),
            str(b),
            "--out",
            str(out),
            "--method",
            "weight",
            "--bn-batches",
            "2",
            "--no-refit",
            "--data-dir",
            str(data),
            "--device",
            "cpu",
            *extra,
        ]
    )


def test_fusing_again_replaces_only_its_own_earlier_result(trained, tmp_path, capsys):
    _, _, (a, b), root = trained
    out = tmp_path / "f.pt"
    assert _fuse(a, b, out, root / "data") == 0
    assert _fuse(a, b, out, root / "data") == 0  # the same inputs: its own earlier result
    capsys.readouterr()
    before = out.read_bytes()
    assert _fuse(b, a, out, root / "data") == 2  # other inputs (order matters: A is the reference)
    assert "is not this command's earlier result" in capsys.readouterr().err and out.read_bytes() == before
    assert _fuse(b, a, out, root / "data", "--overwrite") == 0
    assert load_checkpoint(out)[1]["parents"] == [str(b.resolve()), str(a.resolve())]


def test_a_fusion_run_from_another_folder_never_takes_an_output_for_its_own(trained, tmp_path, capsys, monkeypatch):
    """DAMAGE: parents were recorded as typed (relative) and resolved against the current folder, so the same
    command from another project, whose checkpoints bear the same relative names, replaced this one's model. Now
    they are recorded absolute with their weights' checksums; a parent changed since the fusion does not match
    either; a fine-tune records its start and its teachers the same way."""
    _, _, (a, b), root = trained
    for project, (x, y) in (("projA", (a, b)), ("projB", (b, a))):
        (tmp_path / project / "p").mkdir(parents=True)
        shutil.copy(x, tmp_path / project / "p" / "s0.pt")
        shutil.copy(y, tmp_path / project / "p" / "s1.pt")
    out = tmp_path / "out" / "fused.pt"
    out.parent.mkdir()
    monkeypatch.chdir(tmp_path / "projA")
    assert _fuse("p/s0.pt", "p/s1.pt", "../out/fused.pt", root / "data") == 0
    meta = load_checkpoint(out)[1]
    assert meta["parents"] == [str(tmp_path / "projA" / "p" / f"s{i}.pt") for i in (0, 1)]
    assert meta["parent_digests"] == [load_checkpoint(p)[1]["weights_digest"] for p in (a, b)]
    before = out.read_bytes()
    monkeypatch.chdir(tmp_path / "projB")
    capsys.readouterr()
    assert _fuse("p/s0.pt", "p/s1.pt", "../out/fused.pt", root / "data") == 2
    assert "is not this command's earlier result" in capsys.readouterr().err and out.read_bytes() == before
    monkeypatch.chdir(tmp_path / "projA")
    shutil.copy(a, "p/s1.pt")  # projA's second parent retrained (here: replaced): the fusion is not of these parents any more
    assert _fuse("p/s0.pt", "p/s1.pt", "../out/fused.pt", root / "data") == 2 and out.read_bytes() == before
    shutil.copy(a, "p/s1.pt")
    shutil.copy(b, "p/s0.pt")
    capsys.readouterr()
    ft = ["finetune", "../out/fused.pt", "--epochs", "1", "--distill", "--data-dir", str(root / "data"), "--device", "cpu"]
    assert main([*ft, "--out", "../out/ft.pt"]) == 2  # its teachers are not the parents it was fused from any more
    assert "have changed since the fusion; give --teachers" in capsys.readouterr().err
    assert main([*ft, "--out", "../out/ft.pt", "--teachers", "p/s0.pt,p/s1.pt"]) == 0
    tuned = load_checkpoint(tmp_path / "out" / "ft.pt")[1]
    assert tuned["init"] == str(out) and tuned["init_digest"] == load_checkpoint(out)[1]["weights_digest"]
    assert tuned["teachers"] == [str(tmp_path / "projA" / "p" / f"s{i}.pt") for i in (0, 1)] and len(tuned["teachers_digests"]) == 2


@pytest.mark.slow
def test_results_are_named_by_their_inputs_not_by_inherited_seeds(trained, tmp_path, capsys):
    _, _, (a, b), root = trained
    fused = tmp_path / "fused.pt"
    assert _fuse(a, b, fused, root / "data") == 0
    args = [
        "--points",
        "2",
        "--method",
        "weight",
        "--bn-batches",
        "2",
        "--results-dir",
        str(tmp_path / "res"),
        "--data-dir",
        str(root / "data"),
        "--device",
        "cpu",
    ]
    assert main(["interpolate", str(a), str(b), *args]) == 0
    assert main(["interpolate", str(fused), str(b), *args]) == 0  # fused.pt inherits seed 0 from a.pt
    assert main(["interpolate", str(a), str(b), *args]) == 0  # again: replaces its own earlier result
    capsys.readouterr()
    names = sorted(p.name for p in (tmp_path / "res").glob("interp-*.csv"))
    assert len(names) == 2 and names[0] != names[1] and any(n.split("-w8-")[1].startswith("fused-seed1-") for n in names)


@pytest.mark.slow
def test_two_processes_writing_one_checkpoint_cannot_both_succeed(trained, tmp_path, capsys):
    _, _, _, root = trained
    out = tmp_path / "m.pt"
    cmd = [
        sys.executable,
        "-m",
        "otfuse",
        "train",
        "--dataset",
        "digits",
        "--width",
        "4",
        "--epochs",
        "10",  # long enough to still hold its lock when the second command (in this process, data cached) asks
        "--device",
        "cpu",
        "--data-dir",
        str(root / "data"),
        "--out",
        str(out),
    ]
    first = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    )
    lock = tmp_path / ".m.pt.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    code = main(cmd[3:])
    err = capsys.readouterr().err
    assert code == 2 and "is being written by another otfuse process" in err and len(err.strip().splitlines()) == 1
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert load_checkpoint(out)[1]["epoch"] == 10 and not lock.exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".x.csv.lock").write_text(str(dead.pid))
    with S.output_lock(tmp_path / "x.csv"):
        S.atomic_write_text(tmp_path / "x.csv", "a\n")
    assert (tmp_path / "x.csv").read_text() == "a\n" and not (tmp_path / ".x.csv.lock").exists()


def test_a_full_disk_is_one_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "keep.csv").write_text("old\n")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S.os, "replace", full)
    with pytest.raises(OtfuseError, match="no space left|No space left"):
        S.atomic_write_text(tmp_path / "keep.csv", "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"] and (tmp_path / "keep.csv").read_text() == "old\n"


def test_huge_averaging_weights_are_scaled_not_overflowed():
    assert FuseConfig(weights="1e308,1e308").model_weights(2) == [0.5, 0.5]
    assert FuseConfig(weights="1e308,1.5e308").model_weights(2) == pytest.approx([0.4, 0.6])


def _tree(root, classes=("cat", "dog")) -> None:
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((6, 6, 3), 30 * i + (0 if c == "cat" else 100), np.uint8)).save(root / split / c / f"{i}.png")


def test_hidden_folders_and_files_outside_the_splits_are_skipped(tmp_path):
    root = tmp_path / "imgs"
    _tree(root)
    (root / "train" / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "train" / ".ipynb_checkpoints" / "x.png")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / "README.txt").write_text("my images")
    data = load_dataset(f"imagefolder:{root}", tmp_path / "cache", val_size=0)
    assert data.classes == ["cat", "dog"] and len(data.train_y) == 8


def test_a_renamed_class_folder_is_refused_for_a_checkpoint_trained_before(tmp_path, capsys):
    root = tmp_path / "imgs"
    _tree(root)
    out = tmp_path / "m.pt"
    common = ["--data-dir", str(tmp_path / "cache"), "--device", "cpu"]
    assert (
        main(
            [
                "train",
                "--dataset",
                f"imagefolder:{root}",
                "--width",
                "2",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--val-size",
                "2",
                "--out",
                str(out),
                *common,
            ]
        )
        == 0
    )
    assert load_checkpoint(out)[1]["classes"] == ["cat", "dog"]
    shutil.move(root / "train" / "dog", root / "train" / "puppy")
    shutil.move(root / "test" / "dog", root / "test" / "puppy")
    capsys.readouterr()
    assert main(["evaluate", str(out), *common]) == 2
    assert "has class 'puppy' where it had 'dog'" in capsys.readouterr().err


def test_a_model_without_a_validation_split_says_so_where_one_is_needed(trained, tmp_path, capsys):
    _, _, _, root = trained
    out = tmp_path / "v0.pt"
    common = ["--data-dir", str(root / "data"), "--device", "cpu"]
    assert main(["train", "--dataset", "digits", "--width", "2", "--epochs", "1", "--val-size", "0", "--out", str(out), *common]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "val", *common]) == 2
    assert "has no val images" in capsys.readouterr().err
    assert main(["evaluate", str(out), *common]) == 0
    assert torch.isnan(torch.tensor(load_checkpoint(out)[1]["val_acc"]))
