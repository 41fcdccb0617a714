"""No bad input costs a user a model or a result: every case below exits with code 2 and one line
naming the input, writes no file and changes none that existed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from otfuse.cli import main
from otfuse.sweep import main as sweep_main


@pytest.fixture(scope="module")
def world(trained, tmp_path_factory):
    """Two trained digits checkpoints, copies to damage, and folders for outputs."""
    _, _, paths, root = trained
    w = tmp_path_factory.mktemp("bad")
    a, b = w / "a.pt", w / "b.pt"
    shutil.copy(paths[0], a)
    shutil.copy(paths[1], b)
    ck = w / "ck" / "digits" / "resnet18-w8"
    ck.mkdir(parents=True)
    shutil.copy(paths[0], ck / "seed0.pt")
    shutil.copy(paths[1], ck / "seed1.pt")
    raw = torch.load(a, weights_only=True)
    nan = {**raw, "state_dict": {**raw["state_dict"], "conv1.weight": raw["state_dict"]["conv1.weight"] * float("nan")}}
    torch.save(nan, w / "nan.pt")
    for key, value in (("dataset", None), ("width", "8")):
        meta = {**raw["meta"], key: value} if value is not None else {k: v for k, v in raw["meta"].items() if k != key}
        torch.save({**raw, "meta": meta}, w / f"meta-{key}.pt")
    (w / "cut.pt").write_bytes(a.read_bytes()[:2000])
    (w / "noise.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    (w / "wrongtype.json").write_text(json.dumps({"bn_batches": "many"}))
    (w / "afile").write_text("not a directory")
    (w / "outdir").mkdir()
    for name, extra in (("corrupt", b"\xff\xd8\xff\xe0 truncated"), ("text", b"hello, not an image")):
        root_ = w / f"img-{name}"
        for split in ("train", "test"):
            for c in ("cat", "dog"):
                (root_ / split / c).mkdir(parents=True)
                for i in range(3):
                    Image.fromarray(np.full((4, 4, 3), i * 40, np.uint8)).save(root_ / split / c / f"{i}.png")
        (root_ / "train" / "dog" / ("broken.jpg" if name == "corrupt" else "notes.txt")).write_bytes(extra)
    one = w / "img-oneclass"
    for split in ("train", "test"):
        (one / split / "cat").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(one / split / "cat" / f"{i}.png")
    return w, root / "data"


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


CASES = [
    # (command line with {w} for the case folder, text the error line must hold)
    ("fuse {w}/a.pt {w}/b.pt --solver sinkhorn --reg 0", "--reg 0.0 must be a positive number"),
    ("fuse {w}/a.pt {w}/b.pt --solver sinkhorn --reg -1", "--reg -1.0 must be a positive number"),
    ("fuse {w}/a.pt {w}/b.pt --weights nan,1", "--weights 'nan,1'"),
    ("fuse {w}/a.pt {w}/b.pt --weights inf,1", "--weights 'inf,1'"),
    ("fuse {w}/a.pt {w}/b.pt --weights 1", "give 2 finite"),
    ("fuse {w}/a.pt {w}/b.pt --weights a,b", "must be comma-separated numbers"),
    ("fuse {w}/a.pt {w}/nan.pt", "holds NaN or infinite weights"),
    ("fuse {w}/a.pt {w}/b.pt --out {w}/a.pt", "is one of the input checkpoints"),
    ("fuse {w}/a.pt {w}/b.pt --out {w}/outdir", "is a directory"),
    ("fuse {w}/a.pt {w}/b.pt --out {w}/afile/x.pt", "is a file, not a directory"),
    ("fuse {w}/a.pt {w}/b.pt --bn-batches -3", "--bn-batches -3 must be 0"),
    ("fuse {w}/a.pt {w}/b.pt --bn-batch-size 0", "--bn-batch-size 0"),
    ("fuse {w}/a.pt {w}/b.pt --act-batch-size 0", "--act-batch-size 0"),
    ("fuse {w}/a.pt {w}/b.pt --n-images 1", "--n-images 1 is too small"),
    ("fuse {w}/a.pt {w}/b.pt --mix 2", "--mix 2.0 must be between 0 and 1"),
    ("fuse {w}/a.pt {w}/b.pt --refit-ridge -1", "--refit-ridge -1.0"),
    ("fuse {w}/a.pt {w}/b.pt --method magic", "--method 'magic' is unknown"),
    ("fuse {w}/a.pt {w}/b.pt --device bogus", "--device 'bogus' is not supported"),
    ("fuse {w}/a.pt {w}/b.pt --device mps", "--device 'mps' is not supported"),
    ("fuse {w}/a.pt {w}/b.pt --bn-batches ten", "argument --bn-batches: 'ten' is not an integer"),
    ("fuse {w}/a.pt {w}/b.pt --reg nan", "'nan' is not a finite number"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/wrongtype.json", "bn_batches must be an integer"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/missing.json", "the file does not exist"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/outdir", "is a directory"),
    ("fuse {w}/a.pt {w}/outdir", "is a directory; give the .pt file"),
    ("fuse {w}/a.pt {w}/cut.pt", "is corrupt or truncated"),
    ("fuse {w}/a.pt {w}/noise.pt", "is corrupt or truncated"),
    ("fuse {w}/a.pt {w}/meta-dataset.pt", "metadata dataset is missing"),
    ("fuse {w}/a.pt {w}/meta-width.pt", "metadata width is '8', not an integer"),
    ("fuse {w}/a.pt", "two or more checkpoints"),
    ("evaluate {w}/meta-width.pt", "metadata width"),
    ("evaluate {w}/outdir", "is a directory"),
    ("train --dataset digits --width 4 --epochs 0 --out {w}/new.pt", "--epochs 0 must be at least 1"),
    ("train --dataset digits --width 4 --epochs -1 --out {w}/new.pt", "--epochs -1 must be at least 1"),
    ("train --dataset digits --width 4 --lr nan --out {w}/new.pt", "'nan' is not a finite number"),
    ("train --dataset digits --width 4 --lr -1 --out {w}/new.pt", "--lr -1.0 must be a positive number"),
    ("train --dataset digits --width 4 --batch-size 0 --out {w}/new.pt", "--batch-size 0 must be at least 1"),
    ("train --dataset digits --width 4 --batch-size -5 --out {w}/new.pt", "--batch-size -5 must be at least 1"),
    ("train --dataset digits --width 4 --batch-size 100000 --out {w}/new.pt", "exceeds the"),
    ("train --dataset digits --width 4 --warmup 2 --out {w}/new.pt", "--warmup 2.0 must be between 0 and 1"),
    ("train --dataset digits --width 8 --epochs 8 --out {w}/a.pt", "already exists (epoch 8 of 8); add --resume"),
    ("train --dataset digits --width 8 --epochs 8 --batch-size 64 --lr 0.3 --resume --out {w}/a.pt", "was trained with lr=0.1"),
    ("train --dataset digits --width 8 --epochs 9 --batch-size 64 --lr 0.1 --resume --out {w}/a.pt", "was trained with epochs=8"),
    ("train --dataset digits --resume --overwrite --out {w}/a.pt", "contradict"),
    ("train --dataset nope --out {w}/new.pt", "unknown dataset 'nope'"),
    ("train --dataset digits --checkpoint-dir {w}/afile", "is a file, not a directory"),
    ("train --dataset imagefolder:{w}/img-corrupt --width 4 --out {w}/new.pt", "broken.jpg is not a readable image"),
    ("train --dataset imagefolder:{w}/img-text --width 4 --out {w}/new.pt", "notes.txt is not a readable image"),
    ("train --dataset imagefolder:{w}/img-oneclass --width 4 --out {w}/new.pt", "has 1 class"),
    ("finetune {w}/a.pt --epochs 0 --out {w}/new.pt", "--epochs 0 must be at least 1"),
    ("finetune {w}/missing.pt --out {w}/new.pt", "does not exist"),
    ("finetune {w}/a.pt --width 32 --out {w}/new.pt", "--width 32 differs"),
    ("tune {w}/a.pt {w}/b.pt --n-trials 0 --results-dir {w}/res", "--n-trials 0 must be at least 1"),
    ("tune {w}/a.pt --results-dir {w}/res", "exactly two checkpoints"),
    ("tune {w}/a.pt {w}/b.pt --methods bogus --results-dir {w}/res", "--methods 'bogus'"),
    ("interpolate {w}/a.pt {w}/b.pt --points 1 --results-dir {w}/res", "--points 1"),
    ("sweep --checkpoint-dir {w}/ck --pairs 7-9 --results-dir {w}/res", "--pairs '7-9' matches no pair"),
    ("sweep --checkpoint-dir {w}/ck --pairs 0to1 --results-dir {w}/res", "write seed pairs as A-B"),
    ("sweep --checkpoint-dir {w}/ck --results-dir {w}/afile", "is a file, not a directory"),
    ("sweep --checkpoint-dir {w}/ck --finetune-epochs -1 --results-dir {w}/res", "--finetune-epochs -1"),
    ("sweep --checkpoint-dir {w}/ck --finetune-distill --results-dir {w}/res", "give --finetune-epochs 1"),
    ("fuse {w}/a.pt {w}/b.pt --marginals mass", "--marginals 'mass' is unknown"),
]


@pytest.mark.parametrize("line,message", CASES, ids=[c[0].split("{w}/")[0] + str(i) for i, c in enumerate(CASES)])
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(world, line, message, capsys):
    w, data = world
    before = _snapshot(w)
    cache = _snapshot(data)
    argv = line.format(w=w).split() + ["--data-dir", str(data)]
    try:
        code = sweep_main(argv[1:] + ["--device", "cpu"], "activation") if argv[0] == "sweep" else main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert _snapshot(w) == before, "a file was written or changed"
    assert set(_snapshot(data)) == set(cache), "a dataset cache was written"


def test_the_table_has_at_least_forty_cases():
    assert len(CASES) >= 40
