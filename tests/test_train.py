"""Seeded training: it learns, resumes bit for bit, runs under DDP, and rejects bad inputs clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import otfuse.train as T
from otfuse.checkpoints import load_checkpoint
from otfuse.cli import main
from otfuse.errors import OtfuseError

FAST = dict(dataset="digits", width=8, batch_size=64, lr=0.1, device="cpu")


def _cfg(tmp_path, **kw) -> T.TrainConfig:
    return T.TrainConfig(**{**FAST, "data_dir": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "ck"), **kw})


def test_a_short_run_learns_and_writes_checkpoint_and_log(tmp_path):
    path = T.train(_cfg(tmp_path, epochs=6), progress=False)
    assert path == tmp_path / "ck" / "digits" / "resnet18-w8" / "seed0.pt"
    raw = torch.load(path, weights_only=True)
    meta = raw["meta"]
    assert meta["epoch"] == 6 and meta["test_acc"] > 80 and meta["config"]["lr"] == 0.1
    assert {"arch", "width", "in_channels", "num_classes", "dataset", "mean", "std", "seed", "version"} <= set(meta)
    log = path.with_suffix(".csv").read_text().splitlines()
    assert log[0].startswith("epoch,train_loss") and len(log) == 7


def test_the_seed_fixes_the_weights(tmp_path):
    a = T.train(_cfg(tmp_path / "a", epochs=1), progress=False)
    b = T.train(_cfg(tmp_path / "b", epochs=1), progress=False)
    c = T.train(_cfg(tmp_path / "c", epochs=1, seed=1), progress=False)
    sa, sb, sc = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])


def test_no_augment_trains_as_on_a_dataset_without_augmentation(tmp_path):
    from dataclasses import replace

    from otfuse.data import load_dataset

    digits = load_dataset("digits", tmp_path / "data")
    crops = replace(digits, augment=True)  # digits have no augmentation of their own; give them crops and flips
    runs = {"off": (crops, False), "plain": (digits, True), "on": (crops, True)}
    weights = {
        k: torch.load(T.train(_cfg(tmp_path / k, epochs=1, augment=flag), data, progress=False), weights_only=True)["state_dict"]
        for k, (data, flag) in runs.items()
    }

    def same(a: str, b: str) -> bool:
        return all(torch.equal(weights[a][n], weights[b][n]) for n in weights[a])

    assert same("off", "plain") and not same("on", "plain")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, precision):
    full = T.train(_cfg(tmp_path / "full", epochs=2, precision=precision), progress=False)
    saves = []
    real_save = T.save_checkpoint

    def save_then_die(*args, **kw):
        real_save(*args, **kw)
        saves.append(1)
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after epoch 1's checkpoint

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        T.train(_cfg(tmp_path / "cut", epochs=2, precision=precision), progress=False)
    monkeypatch.setattr(T, "save_checkpoint", real_save)
    cut = T.checkpoint_path(_cfg(tmp_path / "cut", epochs=2))
    assert torch.load(cut, weights_only=True)["meta"]["epoch"] == 1
    T.train(_cfg(tmp_path / "cut", epochs=2, resume=True, precision=precision), progress=False)
    sf, sc = (torch.load(p, weights_only=True) for p in (full, cut))
    assert sc["meta"]["epoch"] == 2 and sc["meta"]["precision"] == sf["meta"]["precision"] == precision
    assert all(torch.equal(sf["state_dict"][k], sc["state_dict"][k]) for k in sf["state_dict"])


def test_bf16_and_fp32_runs_differ_and_resuming_in_another_precision_is_refused(tmp_path):
    a = T.train(_cfg(tmp_path / "a", epochs=1, precision="fp32"), progress=False)
    b = T.train(_cfg(tmp_path / "b", epochs=1, precision="bf16"), progress=False)
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    assert not torch.equal(sa["conv1.weight"], sb["conv1.weight"])  # bf16 really ran: its rounding shows
    with pytest.raises(OtfuseError, match="was trained in fp32 but this run resolves to bf16"):
        T.train(_cfg(tmp_path / "a", epochs=1, precision="bf16", resume=True), progress=False)


def test_resume_rejects_a_checkpoint_of_another_architecture(tmp_path):
    T.train(_cfg(tmp_path, epochs=1), progress=False)
    path = T.checkpoint_path(_cfg(tmp_path))
    wide = path.parent.parent / "resnet18-w16" / "seed0.pt"
    wide.parent.mkdir()
    wide.write_bytes(path.read_bytes())
    with pytest.raises(OtfuseError, match="was trained with width=8 but this run asks for 16"):
        T.train(_cfg(tmp_path, epochs=1, width=16, resume=True), progress=False)


def _cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    dd = ["--data-dir", str(tmp_path / "data"), "--checkpoint-dir", str(tmp_path / "ck")]
    code, err = _cli(["train", "--dataset", "nope", *dd], capsys)
    assert code == 2 and err.count("\n") == 0 and "unknown dataset 'nope'" in err
    code, err = _cli(["train", "--arch", "vgg99", "--dataset", "digits", *dd], capsys)
    assert code == 2 and "unknown architecture 'vgg99'" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _cli(["train", "--dataset", "digits", "--data-dir", str(blocker / "d")], capsys)
    assert code == 2 and "is a file, not a directory" in err
    assert not (tmp_path / "ck").exists()


def test_corrupt_or_truncated_checkpoints_are_one_clear_error(tmp_path, capsys):
    T.train(_cfg(tmp_path, epochs=1), progress=False)
    path = T.checkpoint_path(_cfg(tmp_path))
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = _cli(["evaluate", str(truncated), "--data-dir", str(tmp_path / "data")], capsys)
    assert code == 2 and "is corrupt or truncated" in err and err.count("\n") == 0
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(OtfuseError, match="corrupt or truncated"):
        load_checkpoint(garbage)
    # --resume over a truncated checkpoint: the same clear error
    path.write_bytes(truncated.read_bytes())
    with pytest.raises(OtfuseError, match="corrupt or truncated"):
        T.train(_cfg(tmp_path, epochs=2, resume=True), progress=False)
    code, err = _cli(["evaluate", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and "does not exist" in err


def test_evaluate_prints_the_test_accuracy(tmp_path, capsys):
    T.train(_cfg(tmp_path, epochs=1), progress=False)
    capsys.readouterr()
    assert main(["evaluate", str(T.checkpoint_path(_cfg(tmp_path))), "--data-dir", str(tmp_path / "data")]) == 0
    assert "digits test accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_on_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "otfuse",
        "train",
        "--dataset",
        "digits",
        "--width",
        "8",
        "--epochs",
        "4",
        "--batch-size",
        "64",
        "--lr",
        "0.1",
        "--device",
        "cpu",
        "--data-dir",
        str(tmp_path / "data"),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ck" / "digits" / "resnet18-w8" / "seed0.pt", weights_only=True)
    assert ckpt["meta"]["epoch"] == 4 and ckpt["meta"]["test_acc"] > 50  # chance is 10%: both ranks learned together


def _folder(root, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", 12), ("test", 4)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_a_checkpoint_knows_its_data_by_content_from_any_folder(tmp_path, monkeypatch, capsys):
    """A relative imagefolder path is recorded resolved, with a digest of the decoded data: evaluated from another
    folder the checkpoint reads the same images; where other images sit at that path, it refuses in one line."""
    (tmp_path / "a").mkdir()
    _folder(tmp_path / "a" / "imgs", 0)
    monkeypatch.chdir(tmp_path / "a")
    data_dir = str(tmp_path / "data")
    cfg = _cfg(tmp_path, dataset="imagefolder:imgs", width=4, epochs=1, batch_size=8, val_size=4, out=str(tmp_path / "m.pt"))
    meta = load_checkpoint(T.train(cfg, progress=False))[1]
    assert meta["dataset"] == f"imagefolder:{tmp_path / 'a' / 'imgs'}" and len(meta["data_digest"]) == 32
    (tmp_path / "b").mkdir()
    _folder(tmp_path / "b" / "imgs", 1)  # the same class names, other images, where the relative path now leads
    monkeypatch.chdir(tmp_path / "b")
    assert main(["evaluate", str(tmp_path / "m.pt"), "--data-dir", data_dir, "--device", "cpu"]) == 0
    assert f"{meta['test_acc']:.2f}%" in capsys.readouterr().out  # the data it was trained on, from another folder
    import shutil

    shutil.rmtree(tmp_path / "a" / "imgs")
    _folder(tmp_path / "a" / "imgs", 2)  # other images at the recorded path itself
    assert main(["evaluate", str(tmp_path / "m.pt"), "--data-dir", data_dir, "--device", "cpu"]) == 2
    assert "holds other images or labels than the checkpoint" in capsys.readouterr().err


def test_run_train_all_refuses_a_count_that_is_not_a_number(tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "run_train_all.sh"
    env = {**os.environ, "NPROC": "abc", "DATASETS": "digits"}
    run = subprocess.run([str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip() == "run_train_all.sh: NPROC=abc is not a whole number; e.g. NPROC=1"


def _train_all_arguments(tmp_path, **env) -> list[str]:
    """The arguments run_train_all.sh passes to otfuse (a stand-in on PATH records them; nothing trains); an
    environment variable given as None is unset."""
    from pathlib import Path

    stub = tmp_path / "bin" / "otfuse"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "args"}\n')
    stub.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "run_train_all.sh"
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}", "SEEDS": "0", "DATASETS": "digits", **env}
    subprocess.run([str(script)], env={k: v for k, v in env.items() if v is not None}, check=True, capture_output=True, cwd=tmp_path)
    return (tmp_path / "args").read_text().split("\n")


def test_run_train_all_uses_the_data_dir_the_container_mounts(tmp_path):
    """In the container OTFUSE_DATA_DIR names the mounted data dir that the fusion scripts read: training must use it
    too (it used ~/.cache/otfuse, thrown away with the container); DATA_DIR still overrides it."""
    args = _train_all_arguments(tmp_path, OTFUSE_DATA_DIR="/data", DATA_DIR=None)
    assert args[args.index("--data-dir") + 1] == "/data"
    args = _train_all_arguments(tmp_path, OTFUSE_DATA_DIR="/data", DATA_DIR=str(tmp_path / "mine"))
    assert args[args.index("--data-dir") + 1] == str(tmp_path / "mine")


def _rank_loads(rank: int, init: str, data_dir: str, log: str) -> None:
    """One process of a two-process gloo group: counts (in `log`) how often digits is decoded, slowly enough that two
    ranks decoding at once would both show."""
    import time

    import otfuse.data as D

    decode = D._decode_digits

    def counted():
        with open(log, "a") as f:
            f.write(f"{rank}\n")
        time.sleep(1.0)
        return decode()

    D._decode_digits = counted
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        data = T.load_dataset_on_ranks("digits", data_dir, None, rank, 2)
        assert data.num_classes == 10
    finally:
        torch.distributed.destroy_process_group()


def test_under_ddp_rank_0_decodes_the_data_and_the_others_read_its_cache(tmp_path):
    """torchrun starts every rank at once on one data dir: only rank 0 may decode or download into it."""
    import torch.multiprocessing as mp

    log = tmp_path / "decoded"
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_rank_loads, args=(init, str(tmp_path / "data"), str(log)), nprocs=2, start_method="spawn", join=True)
    assert log.read_text().split() == ["0"]


def test_training_a_model_with_a_narrow_strided_1x1_conv_runs_without_onednn_on_the_cpu():
    """oneDNN's weight gradient of a strided 1x1 conv with fewer input channels than its block (8 on AVX2, 16 on
    AVX-512) writes past its workspace and corrupts the heap (on AVX2 a width-4 ResNet18 aborted test processes at
    random); training such a model turns oneDNN off, and only while it trains."""
    from otfuse.models import build_model

    cpu = torch.device("cpu")
    narrow, wide = build_model("resnet18", 4, 3, 10, 32), build_model("resnet18", 16, 3, 10, 32)
    assert torch.backends.mkldnn.enabled
    with T.onednn_where_it_is_sound(narrow, cpu):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled
    with T.onednn_where_it_is_sound(wide, cpu):
        assert torch.backends.mkldnn.enabled
