"""No bad input costs a user a model or a result: every case below exits with code 2 and one line
naming the input, writes no file and changes none that existed."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tarfile
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
    digest = raw["meta"].pop("weights_digest")  # the damaged copies below carry none (as older files), so each check shows
    nan = {**raw, "state_dict": {**raw["state_dict"], "conv1.weight": raw["state_dict"]["conv1.weight"] * float("nan")}}
    torch.save(nan, w / "nan.pt")
    for key, value in (("dataset", None), ("width", "8")):
        meta = {**raw["meta"], key: value} if value is not None else {k: v for k, v in raw["meta"].items() if k != key}
        torch.save({**raw, "meta": meta}, w / f"meta-{key}.pt")
    (w / "cut.pt").write_bytes(a.read_bytes()[:2000])
    (w / "noise.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    (w / "wrongtype.json").write_text(json.dumps({"bn_batches": "many"}))
    (w / "digits401.json").write_text('{"refit_ridge": ' + "1" * 401 + "}")  # a float option no float can hold
    (w / "deep.json").write_text('{"_note": ' + "[" * 200_000 + "]" * 200_000 + "}")  # under an ignored note, too
    (w / "twice.json").write_text('{"refit_ridge": 0.1, "refit_ridge": 0.2}')
    (w / "afile").write_text("not a directory")
    (w / "outdir").mkdir()
    for name, extra in (("corrupt", b"\xff\xd8\xff\xe0 truncated"), ("text", b"hello, not an image")):
        root_ = _image_tree(w / f"img-{name}")
        (root_ / "train" / "dog" / ("broken.jpg" if name == "corrupt" else "notes.txt")).write_bytes(extra)
    _image_tree(w / "img-oneclass", classes=("cat",))
    _damaged_checkpoints(w, raw, digest)
    _bad_image_folders(w)
    _bad_data_dirs(w)
    _outputs_that_exist(w, a)
    _sweep_folders(w, paths)
    return w, root / "data"


def _image_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """train/<class>/ and test/<class>/ with three small PNGs each."""
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((4, 4, 3), i * 40, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _damaged_checkpoints(w: Path, raw: dict, digest: str) -> None:
    """Checkpoints that load as files but are not sound: each a copy of a.pt with one thing wrong (`flipped`: one weight
    changed under the checksum `digest` written with the original)."""
    sd, meta = raw["state_dict"], raw["meta"]
    var = next(k for k in sd if k.endswith("running_var"))
    for name, ckpt in {
        "negvar": {**raw, "state_dict": {**sd, var: -sd[var]}},
        "huge": {**raw, "state_dict": {**sd, "conv1.weight": sd["conv1.weight"] * 1e30}},
        "intweight": {**raw, "state_dict": {**sd, "conv1.weight": sd["conv1.weight"].long()}},
        "shape": {**raw, "state_dict": {**sd, "conv1.weight": sd["conv1.weight"][:2]}},
        "missing": {**raw, "state_dict": {k: v for k, v in sd.items() if k != "conv1.weight"}},
        "extra": {**raw, "state_dict": {**sd, "stray.weight": sd["conv1.weight"]}},
        "statelist": {**raw, "state_dict": list(sd.values())},
        "toplist": [raw["state_dict"], raw["meta"]],
        "meanlen": {**raw, "meta": {**meta, "mean": meta["mean"] + [0.5, 0.5]}},
        "stdzero": {**raw, "meta": {**meta, "std": [0.0] * len(meta["std"])}},
        "stdtext": {**raw, "meta": {**meta, "std": "0.2"}},
        "classes1": {**raw, "meta": {**meta, "num_classes": 1}},
        "inch0": {**raw, "meta": {**meta, "in_channels": 0}},
        "widthneg": {**raw, "meta": {**meta, "width": -8}},
        "seedtext": {**raw, "meta": {**meta, "seed": "0"}},
        "kind": {**raw, "meta": {**meta, "kind": "bogus"}},
        "parents": {**raw, "meta": {**meta, "parents": "a.pt,b.pt"}},
        "classnames": {**raw, "meta": {**meta, "classes": ["zero", "one"]}},
        "trainacc": {**raw, "meta": {**meta, "train_acc": "high"}},
        "history": {**raw, "meta": {**meta, "history": {"epoch": 1}}},
        "archbool": {**raw, "meta": {**meta, "width": True}},
        "meanhuge": {**raw, "meta": {**meta, "mean": [1e308] * len(meta["mean"])}},
        "stdtiny": {**raw, "meta": {**meta, "std": [1e-300] * len(meta["std"])}},
        "epochneg": {**raw, "meta": {**meta, "epoch": -1}},
        # a mean other than the dataset's: evaluate read the metadata's, fuse the dataset's (10% against 95%)
        # metadata naming a model far larger than the file (43 GB from 400 KB): refused from shapes, before allocating
        "hugewidth": {**raw, "meta": {**meta, "width": 2000}},
        "widthfits": {**raw, "meta": {**meta, "width": 500}},
        "var0": {**raw, "state_dict": {**sd, **{k: torch.zeros_like(t) for k, t in sd.items() if k.endswith("running_var")}}},
        "othermean": {**raw, "meta": {**meta, "mean": [min(1.0, m + 0.3) for m in meta["mean"]]}},
        "flipped": {
            **raw,
            "meta": {**meta, "weights_digest": digest},
            "state_dict": {
                **sd,
                "conv1.weight": sd["conv1.weight"].flatten().index_fill(0, torch.tensor([3]), 0.125).view_as(sd["conv1.weight"]),
            },
        },
        "otherclasses": {**raw, "meta": {**meta, "classes": [f"c{i}" for i in range(meta["num_classes"])]}},
        "otherdata": {**raw, "meta": {**meta, "dataset": "fashion-mnist"}},
    }.items():
        torch.save(ckpt, w / f"bad-{name}.pt")


def _bad_image_folders(w: Path) -> None:
    """Image folders that break `split/class/file`: deeper files, a file outside a class, a nested split, a link,
    classes that differ between train and test, and truncated or linked archives."""

    def folder(name: str, extra: list[str]) -> Path:
        root = _image_tree(w / f"img-{name}")
        for rel in extra:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / rel)
        return root

    wide = w / "img-wide"  # 8 x 12 pictures: the vit is built for square ones
    for rel in ("train/cat/0.png", "train/cat/1.png", "train/dog/0.png", "train/dog/1.png", "test/cat/0.png", "test/dog/0.png"):
        (wide / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 12, 3), 9 * len(rel), np.uint8)).save(wide / rel)
    folder("deep", ["train/cat/kittens/k.png"])
    folder("loose", ["train/loose.png"])
    folder("nested", ["train/cat/test/dog/n.png"])
    folder("onlytrain", ["train/bird/b.png"])
    link = folder("link", [])
    (link / "train" / "bird").symlink_to(link / "train" / "cat")
    (link / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(link / "test" / "bird" / "b.png")
    good = folder("tarsrc", [])
    with tarfile.open(w / "cut.tar.xz", "w:xz") as tar:
        tar.add(good, arcname="data")
    blob = (w / "cut.tar.xz").read_bytes()
    (w / "cut.tar.xz").write_bytes(blob[: len(blob) // 2])
    with tarfile.open(w / "linked.tar", "w") as tar:
        tar.add(good, arcname="data")
        info = tarfile.TarInfo("data/train/cat/linked.png")
        info.type, info.linkname = tarfile.SYMTYPE, "0.png"
        tar.addfile(info)


def _bad_data_dirs(w: Path) -> None:
    """Data dirs whose dataset files are there but damaged (a disk error, an interrupted copy)."""
    cifar = w / "baddata-cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (cifar / f).write_bytes(b"\x80\x04 truncated pickle")
    fashion = w / "baddata-fashion" / "FashionMNIST" / "raw"
    fashion.mkdir(parents=True)
    for n in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        (fashion / n).write_bytes(b"\x00\x00\x08")


HELD: list = []  # lock files this module holds for its cases, as another live process would


def _outputs_that_exist(w: Path, a: Path) -> None:
    """Files an output must not replace: a trained checkpoint that is no parent, a config, a user's CSV, a held lock."""
    shutil.copy(a, w / "other.pt")
    (w / "cfg.json").write_text(json.dumps({"bn_batches": 4}))
    (w / "user.csv").write_text("name,value\nmine,1\n")
    os.mkfifo(w / "fifo")  # a read would block forever
    (w / "loop").symlink_to(w / "loop")
    (w / "keras.csv").write_text("epoch,loss,accuracy\n0,0.91,0.71\n1,0.52,0.83\n")  # a Keras CSVLogger file: looks like a log
    (w / ".dirlock.pt.lock").mkdir()  # a directory where the lock file goes
    (w / "locked-results").mkdir()
    for lock in (w / ".locked.pt.lock", w / "locked-results" / ".summary.md.lock"):  # held, as a live writer holds it
        lock.write_text("1")
        HELD.append(open(lock))
        fcntl.flock(HELD[-1].fileno(), fcntl.LOCK_EX)


def _sweep_folders(w: Path, paths: list[Path]) -> None:
    """Checkpoint dirs for the fusion scripts: two files of one seed, parents of different validation splits."""
    dup = w / "ck-dup" / "digits" / "resnet18-w8"
    dup.mkdir(parents=True)
    shutil.copy(paths[0], dup / "seed0.pt")
    shutil.copy(paths[0], dup / "seed0-copy.pt")
    shutil.copy(paths[1], dup / "seed1.pt")
    raw = torch.load(paths[0], weights_only=True)  # a fusion of other parents where the script would write its own
    torch.save(
        {**raw, "meta": {**raw["meta"], "kind": "fused", "parents": ["x.pt", "y.pt"]}},
        w / "ck" / "digits" / "resnet18-w8" / "fused-activation-seeds0-1.pt",
    )
    ft = w / "ck-ft" / "digits" / "resnet18-w8"  # a user's own fine-tune where --finetune-epochs 1 would write
    ft.mkdir(parents=True)
    shutil.copy(paths[0], ft / "seed0.pt")
    shutil.copy(paths[1], ft / "seed1.pt")
    mine = torch.load(paths[0], weights_only=True)
    torch.save({**mine, "meta": {**mine["meta"], "kind": "finetuned", "init": "my-own-fusion.pt"}}, ft / "fused-activation-seeds0-1-ft1.pt")
    split = w / "ck-split" / "digits" / "resnet18-w8"
    split.mkdir(parents=True)
    shutil.copy(paths[0], split / "seed0.pt")
    raw = torch.load(paths[1], weights_only=True)
    torch.save({**raw, "meta": {**raw["meta"], "val_size": 17}}, split / "seed1.pt")


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file's size, modification time and inode: a write, a replace or a touch changes one of them."""
    return {str(p.relative_to(folder)): (s.st_size, s.st_mtime_ns, s.st_ino) for p in folder.rglob("*") if p.is_file() for s in [p.stat()]}


CASES = [
    # (command line with {w} for the case folder, text the error line must hold)
    ("fuse {w}/a.pt {w}/b.pt --solver sinkhorn --reg 0", "--reg 0.0 must be a positive number"),
    ("fuse {w}/a.pt {w}/b.pt --solver sinkhorn --reg -1", "--reg -1.0 must be a positive number"),
    ("fuse {w}/a.pt {w}/b.pt --weights nan,1", "--weights 'nan,1'"),
    ("fuse {w}/a.pt {w}/b.pt --weights inf,1", "--weights 'inf,1'"),
    ("fuse {w}/a.pt {w}/b.pt --weights 1", "give 2 finite"),
    ("fuse {w}/a.pt {w}/b.pt --weights a,b", "must be comma-separated numbers"),
    ("fuse {w}/a.pt {w}/nan.pt", "holds NaN or infinite weights"),
    ("fuse {w}/a.pt {w}/b.pt --out {w}/a.pt", "is also input checkpoint 1"),
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
    ("fuse {w}/a.pt {w}/b.pt --config {w}/digits401.json", "has 401 digits, more than any option takes"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/deep.json", "nested too deeply to be a file of options"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/twice.json", "the key 'refit_ridge' is given twice"),
    ("fuse {w}/a.pt {w}/b.pt --fusion-data 12345678901234567890123-per-class", "give union"),
    ("fuse {w}/a.pt {w}/b.pt --width 9999", "--width 9999 must be from 1 to 512"),
    ("train --dataset digits --width 100000 --out {w}/new.pt", "--width 100000 must be from 1 to 512"),
    ("train --dataset digits --width 4 --batch-size 1 --out {w}/new.pt", "--batch-size 1 must be at least 2 (BatchNorm needs two"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/missing.json", "missing.json does not exist"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/fifo", "is not a regular file"),
    ("fuse {w}/a.pt {w}/b.pt --config /dev/zero", "is not a regular file"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/loop", "is a loop of symbolic links"),
    ("fuse {w}/a.pt {w}/fifo", "is not a regular file"),
    ("tune {w}/a.pt {w}/b.pt --n-trials 1 --storage {w}/fifo --results-dir {w}/res", "is not a regular file"),
    ("train --dataset imagefolder:{w}/fifo --width 4 --out {w}/new.pt", "is not a regular file"),
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
    ("train --dataset digits --width 4 --lr 1e308 --out {w}/new.pt", "--lr 1e+308 must be a positive number, at most 100"),
    ("train --dataset digits --width 4 --weight-decay 1e308 --out {w}/new.pt", "--weight-decay 1e+308 must be from 0 to 10"),
    ("finetune {w}/a.pt --distill --temperature 1e308 --out {w}/new.pt", "--temperature 1e+308 must be a positive number"),
    ("fuse {w}/a.pt {w}/b.pt --refit-ridge 1e308", "--refit-ridge 1e+308 must be from 0 to 1e6"),
    ("train --dataset digits --width 4 --batch-size 0 --out {w}/new.pt", "--batch-size 0 must be at least 2"),
    ("train --dataset digits --width 4 --batch-size -5 --out {w}/new.pt", "--batch-size -5 must be at least 2"),
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
    # --- the second round: outputs never replace what they should not, and are never inputs ---
    ("fuse {w}/a.pt {w}/b.pt --out {w}/other.pt", "already exists and is not this command's earlier result"),
    ("fuse {w}/a.pt {w}/b.pt --out {w}/user.csv", "already exists and is not this command's earlier result"),
    ("fuse {w}/a.pt {w}/b.pt --config {w}/cfg.json --out {w}/cfg.json", "is also --config"),
    ("fuse {w}/a.pt {w}/b.pt --out {w}/b.pt --overwrite", "is also input checkpoint 2"),
    ("fuse {w}/a.pt {w}/b.pt --out {w}/locked.pt", "is being written by another otfuse process (pid 1)"),
    (
        "fuse {w}/a.pt {w}/b.pt --out {w}/" + "n" * 300 + ".pt",
        "more than the 255 a file system allows",
    ),
    ("fuse {w}/a.pt {w}/b.pt --out {w}/dirlock.pt", "where otfuse keeps the lock of"),
    ("train --dataset digits --width 4 --epochs 1 --out {w}/model.csv", "ends in .csv"),
    ("train --dataset digits --width 4 --epochs 1 --out {w}/user.pt", "the per-epoch log"),
    ("train --dataset digits --width 4 --epochs 1 --out {w}/locked.pt", "is being written by another otfuse process"),
    ("train --dataset digits --width 4 --epochs 1 --out {w}/keras.pt", "the per-epoch log"),
    ("finetune {w}/a.pt --out {w}/a.pt --overwrite", "is also the checkpoint it starts from"),
    ("finetune {w}/a.pt --distill --teachers {w}/b.pt --out {w}/b.pt --overwrite", "is also teacher"),
    ("finetune {w}/a.pt --out {w}/other.pt", "already exists"),
    # --- checkpoints: every tensor and metadata field checked on load ---
    ("evaluate {w}/bad-negvar.pt", "holds negative values"),
    ("evaluate {w}/bad-huge.pt", "beyond any trained network"),
    ("evaluate {w}/bad-intweight.pt", "is torch.int64, not a floating-point tensor"),
    ("evaluate {w}/bad-shape.pt", "does not match its own metadata"),
    ("evaluate {w}/bad-missing.pt", "does not match its own metadata"),
    ("evaluate {w}/bad-extra.pt", "does not match its own metadata"),
    ("evaluate {w}/bad-statelist.pt", "is not a mapping of names to tensors"),
    ("evaluate {w}/bad-toplist.pt", "is not an otfuse checkpoint"),
    ("evaluate {w}/bad-meanlen.pt", "metadata mean"),
    ("evaluate {w}/bad-stdzero.pt", "metadata std"),
    ("evaluate {w}/bad-stdtext.pt", "metadata std"),
    ("evaluate {w}/bad-classes1.pt", "metadata num_classes"),
    ("evaluate {w}/bad-inch0.pt", "metadata in_channels"),
    ("evaluate {w}/bad-widthneg.pt", "metadata width"),
    ("evaluate {w}/bad-seedtext.pt", "metadata seed"),
    ("evaluate {w}/bad-kind.pt", "metadata kind"),
    ("evaluate {w}/bad-parents.pt", "metadata parents"),
    ("evaluate {w}/bad-classnames.pt", "metadata classes"),
    ("evaluate {w}/bad-trainacc.pt", "metadata train_acc"),
    ("evaluate {w}/bad-history.pt", "metadata history"),
    ("evaluate {w}/bad-archbool.pt", "metadata width"),
    ("fuse {w}/a.pt {w}/bad-negvar.pt", "holds negative values"),
    ("evaluate {w}/bad-meanhuge.pt", "metadata mean"),
    ("evaluate {w}/bad-stdtiny.pt", "metadata std"),
    ("evaluate {w}/bad-epochneg.pt", "metadata epoch"),
    ("evaluate {w}/bad-flipped.pt", "is damaged: its weights differ from the checksum"),
    ("evaluate {w}/bad-hugewidth.pt", "metadata width is 2000, not a width from 0 to 512"),
    ("evaluate {w}/bad-widthfits.pt", "does not match its own metadata (conv1.weight: (500, 1, 3, 3) in the model, (8, 1, 3, 3)"),
    ("evaluate {w}/bad-var0.pt", "computes NaN or infinite outputs"),
    (
        "train --dataset digits --width 4 --split-seed 3 --out {w}/new.pt",
        "--split-seed 3 fixes which images --classes or --partition draws",
    ),
    ("train --dataset digits --width 4 --classes 0-4 --bias 1e-13 --out {w}/new.pt", "draws no training image of class 0-4"),
    ("evaluate {w}/bad-othermean.pt", "records its inputs normalised with mean"),
    ("fuse {w}/bad-othermean.pt {w}/b.pt", "records its inputs normalised with mean"),
    ("fuse {w}/a.pt {w}/bad-othermean.pt", "records its inputs normalised with mean"),
    ("fuse {w}/a.pt {w}/bad-otherclasses.pt", "trained on classes that differ"),
    ("fuse {w}/bad-otherclasses.pt {w}/a.pt", "trained on classes that differ"),
    ("finetune {w}/a.pt --distill --teachers {w}/bad-otherdata.pt,{w}/b.pt --out {w}/new.pt", "was trained on fashion-mnist"),
    # --- numbers beyond what the machine holds ---
    ("train --dataset digits --width 4 --seed 99999999999999999999 --out {w}/new.pt", "beyond a 64-bit integer"),
    ("train --dataset digits --width 4 --seed -1 --out {w}/new.pt", "a seed is from 0"),
    ("fuse {w}/a.pt {w}/b.pt --bn-batches 99999999999999999999", "beyond a 64-bit integer"),
    ("interpolate {w}/a.pt {w}/b.pt --points 100000000 --results-dir {w}/res", "give 2 (the two parents) to 1001"),
    # --- image folders: exactly split/class/file ---
    ("train --dataset imagefolder:{w}/img-deep --width 4 --out {w}/new.pt", "train/cat/kittens/k.png lies below a class folder"),
    ("train --dataset imagefolder:{w}/img-loose --width 4 --out {w}/new.pt", "train/loose.png lies directly in train/"),
    ("train --dataset imagefolder:{w}/img-nested --width 4 --out {w}/new.pt", "train/cat/test/dog/n.png lies below a class folder"),
    ("train --dataset imagefolder:{w}/img-onlytrain --width 4 --out {w}/new.pt", "only in one of them: bird"),
    ("train --dataset imagefolder:{w}/img-link --width 4 --out {w}/new.pt", "train/bird is a symbolic link"),
    ("train --dataset imagefolder:{w}/cut.tar.xz --width 4 --out {w}/new.pt", "is corrupt or truncated"),
    ("train --dataset imagefolder:{w}/linked.tar --width 4 --out {w}/new.pt", "data/train/cat/linked.png is a link"),
    # --- damaged dataset files in the data dir ---
    ("train --dataset cifar10 --width 4 --out {w}/new.pt --data-dir {w}/baddata-cifar", "are corrupt or truncated"),
    ("train --dataset fashion-mnist --width 4 --out {w}/new.pt --data-dir {w}/baddata-fashion", "are corrupt or truncated"),
    # --- tune storages that are not one ---
    ("tune {w}/a.pt {w}/b.pt --n-trials 1 --storage {w}/afile --results-dir {w}/res", "--storage"),
    ("tune {w}/a.pt {w}/b.pt --n-trials 1 --study ../../victim --results-dir {w}/res", "a study name goes into file names"),
    ("tune {w}/a.pt {w}/b.pt --n-trials 1 --study a/b --results-dir {w}/res", "no path separators"),
    # --- the fusion scripts: the checks of otfuse fuse, and checkpoint folders in odd states ---
    ("sweep --checkpoint-dir {w}/ck-dup --results-dir {w}/res", "are both seed 0"),
    ("sweep --checkpoint-dir {w}/ck-split --results-dir {w}/res", "fuse models trained on the same split"),
    (
        "sweep --checkpoint-dir {w}/ck-ft --results-dir {w}/res --finetune-epochs 1",
        "seeds0-1-ft1.pt already exists and is not this command's",
    ),
    ("sweep --checkpoint-dir {w}/ck --results-dir {w}/locked-results", "summary.md is being written by another otfuse process"),
    ("sweep --checkpoint-dir {w}/ck --results-dir {w}/res", "fused-activation-seeds0-1.pt already exists and is not this command's"),
]


@pytest.mark.parametrize("line,message", CASES, ids=[c[0].split("{w}/")[0] + str(i) for i, c in enumerate(CASES)])
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(world, line, message, capsys):
    w, data = world
    before = _snapshot(w)
    cache = _snapshot(data)
    argv = line.format(w=w).split() + ([] if "--data-dir" in line else ["--data-dir", str(data)])
    try:
        code = sweep_main(argv[1:] + ["--device", "cpu"], "activation") if argv[0] == "sweep" else main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert _snapshot(w) == before, "a file was written or changed"
    assert set(_snapshot(data)) == set(cache), "a dataset cache was written"


def test_a_checkpoint_with_one_flipped_weight_byte_is_refused(world, capsys):
    """torch does not check its zip's CRCs: a changed byte inside a weight tensor loads without a word, unless the
    checkpoint's own checksum catches it."""
    import struct
    import zipfile

    w, data = world
    flipped = w / "flip-copy.pt"
    shutil.copy(w / "a.pt", flipped)
    with zipfile.ZipFile(flipped) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(flipped, "r+b") as f:
        f.seek(entry.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    assert main(["evaluate", str(flipped), "--data-dir", str(data)]) == 2
    assert "is damaged: its weights differ from the checksum" in capsys.readouterr().err
    flipped.unlink()


def test_text_from_files_and_metadata_reaches_the_terminal_escaped(world, tmp_path, capsys):
    """A file name or a forged metadata string with terminal escapes (erase the line, move the cursor up, reorder
    text) cannot fake or hide what otfuse prints: each control character is shown as an escape."""
    w, data = world
    fake = "\x1b[2K\r\x1b[1Aaccuracy 99.99%\u202e"
    named = tmp_path / f"m{fake}.pt"
    shutil.copy(w / "a.pt", named)
    raw = torch.load(w / "a.pt", weights_only=True)
    forged = tmp_path / "forged.pt"
    torch.save({**raw, "meta": {**raw["meta"], "dataset": f"digits{fake}"}}, forged)
    relabelled = tmp_path / "relabelled.pt"
    torch.save({**raw, "meta": {**raw["meta"], "classes": [f"{c}{fake}" for c in raw["meta"]["classes"]]}}, relabelled)
    assert main(["evaluate", str(named), "--data-dir", str(data), "--device", "cpu"]) == 0
    assert main(["evaluate", str(forged), "--data-dir", str(data), "--device", "cpu"]) == 2
    assert main(["evaluate", str(relabelled), "--data-dir", str(data), "--device", "cpu"]) == 2
    with pytest.raises(SystemExit):
        main(["evaluate", str(named), "--split", fake])
    out, err = capsys.readouterr()
    for shown in (out, err):
        assert not any(c in shown for c in "\x1b\r\u202e") and "\\x1b[2K" in shown and "\\u202e" in shown
    assert len(out.splitlines()) == 1 and len(err.splitlines()) == 3


def test_file_names_that_are_not_utf8_are_read_written_and_shown(world, tmp_path, capsys):
    """A file name of bytes that are not UTF-8 (caf\\xe9.pt from a Latin-1 system) can be evaluated, fused and
    written, and is shown with the byte escaped."""
    w, data = world
    latin = tmp_path / os.fsdecode(b"caf\xe9.pt")
    shutil.copy(w / "a.pt", latin)
    out = tmp_path / os.fsdecode(b"f\xff.pt")
    args = ["--data-dir", str(data), "--device", "cpu"]
    assert main(["evaluate", str(latin), *args]) == 0
    assert main(["fuse", str(latin), str(w / "b.pt"), "--out", str(out), "--n-images", "100", "--refit-n-images", "100", *args]) == 0
    assert out.is_file() and main(["evaluate", str(out), *args]) == 0
    shown = capsys.readouterr().out
    assert "caf\\xe9.pt: digits test accuracy" in shown and "f\\xff.pt: digits test accuracy" in shown


def test_fusion_data_of_one_image_is_one_line(world):
    """BatchNorm statistics from one image are undefined: the fusion says so instead of failing inside torch."""
    from otfuse.errors import OtfuseError
    from otfuse.fusion import fuse
    from otfuse.inputs import fusion_inputs

    w, data = world
    inputs = fusion_inputs([w / "a.pt", w / "b.pt"], {"refit": False}, data_dir=data, device="cpu")
    with pytest.raises(OtfuseError, match="fusion reads 1 image"):
        fuse(inputs.models, inputs.data.train_x[:1], inputs.data.norm, inputs.cfg)


def test_an_architecture_that_cannot_take_the_images_is_one_line_before_training(world, tmp_path, capsys):
    """The vit is built for square images: 8 x 12 pictures failed in the first step with a shape error. (The valid
    dataset's cache may be written: it is the data, decoded.)"""
    w, _ = world
    out = tmp_path / "v.pt"
    argv = ["train", "--dataset", f"imagefolder:{w}/img-wide", "--arch", "vit", "--batch-size", "2", "--out", str(out)]
    assert main([*argv, "--data-dir", str(tmp_path / "data"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--arch vit cannot take imagefolder" in err and "8 x 12 images" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
