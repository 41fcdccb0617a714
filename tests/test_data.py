"""Every dataset source decodes into cached uint8 tensors; offline failures are one clear error."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from otfuse import data as D
from otfuse.errors import OtfuseError


def test_digits_is_embedded_and_split_with_a_fixed_validation_set(tmp_data_dir):
    d = D.load_dataset("digits", tmp_data_dir)
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape[1:] == (1, 8, 8)
    assert len(d.test_y) == 360 and len(d.train_y) + len(d.val_y) == 1437 and len(d.val_y) == 143
    again = D.load_dataset("digits", tmp_data_dir)
    assert torch.equal(d.val_x, again.val_x) and d.num_classes == 10 and not d.augment
    assert list((tmp_data_dir / "cache").glob("digits-*.pt"))


def _write_idx(path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_is_decompressed_from_the_debian_folder(tmp_path, tmp_data_dir, monkeypatch):
    system = tmp_path / "debian"
    system.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        _write_idx(system / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(system / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("OTFUSE_FASHION_MNIST_DIR", str(system))
    d = D.load_dataset("fashion-mnist", tmp_data_dir, val_size=10)
    assert d.train_x.shape == (50, 1, 28, 28) and d.test_x.shape == (20, 1, 28, 28)
    assert (tmp_data_dir / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    # torchvision reads the decompressed files unchanged
    tv = torchvision.datasets.FashionMNIST(str(tmp_data_dir), train=False, download=False)
    assert torch.equal(tv.data[:, None], d.test_x)


def _no_internet(*args, **kwargs):
    raise urllib.error.URLError("no network")


def test_missing_fashion_mnist_without_internet_names_the_offline_choices(tmp_path, tmp_data_dir, monkeypatch):
    monkeypatch.setenv("OTFUSE_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _no_internet)
    with pytest.raises(OtfuseError, match="apt-get install -y dataset-fashion-mnist.*digits"):
        D.load_dataset("fashion-mnist", tmp_data_dir)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_torchvisions_pickles(name, tmp_data_dir):
    rng = np.random.default_rng(0)
    folder = tmp_data_dir / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir()
    key = "labels" if name == "cifar10" else "fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    arrays, labels = {}, {}
    for f in files:
        arrays[f], labels[f] = rng.integers(0, 256, (8, 3072), dtype=np.uint8), list(rng.integers(0, 10, 8))
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": arrays[f], key: labels[f]}, fh)
    classes = [f"c{i}" for i in range(10)]
    with open(folder / ("batches.meta" if name == "cifar10" else "meta"), "wb") as fh:
        pickle.dump({"label_names" if name == "cifar10" else "fine_label_names": classes}, fh)
    d = D.load_dataset(name, tmp_data_dir, val_size=4)
    assert d.test_x.shape == (8, 3, 32, 32) and d.classes == classes
    # torchvision's layout: 1024 red, then green, then blue values, row-major; CIFAR-100 read by class (stably)
    first = int(np.argsort(labels[files[-1]], kind="stable")[0]) if name == "cifar100" else 0
    assert torch.equal(d.test_x[0, 1].reshape(-1), torch.from_numpy(arrays[files[-1]][first, 1024:2048]))
    assert d.test_y.tolist() == (sorted(labels[files[-1]]) if name == "cifar100" else labels[files[-1]])
    assert len(d.train_y) + len(d.val_y) == 8 * (len(files) - 1)


def test_missing_cifar_without_internet_names_the_offline_choices(tmp_data_dir, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _no_internet)
    with pytest.raises(OtfuseError, match="cannot download cifar10.*offline choices.*imagefolder"):
        D.load_dataset("cifar10", tmp_data_dir)


def _image_tree(root, n=3, size=6):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_imagefolder_reads_a_folder_and_its_tar_xz_alike(tmp_path, tmp_data_dir):
    root = tmp_path / "imgs"
    _image_tree(root)
    archive = tmp_path / "imgs.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="imgs")
    a = D.load_dataset(f"imagefolder:{root}", tmp_data_dir, val_size=1)
    b = D.load_dataset(f"imagefolder:{archive}", tmp_data_dir, val_size=1)
    assert a.classes == ["cat", "dog"] and a.test_x.shape == (6, 3, 6, 6)
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_x, b.train_x)
    assert D.dataset_slug(f"imagefolder:{archive}") == "imagefolder-imgs"


def test_a_changed_source_invalidates_the_cache(tmp_path, tmp_data_dir):
    root = tmp_path / "imgs"
    _image_tree(root)
    before = D.load_dataset(f"imagefolder:{root}", tmp_data_dir, val_size=0)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "test" / "dog" / "0.png")
    after = D.load_dataset(f"imagefolder:{root}", tmp_data_dir, val_size=0)
    assert not torch.equal(before.test_x, after.test_x) and int(after.test_x[-3].sum()) == 0


def test_bad_names_and_paths_are_one_clear_error(tmp_path, tmp_data_dir):
    with pytest.raises(OtfuseError, match="unknown dataset 'mnist3d'"):
        D.load_dataset("mnist3d", tmp_data_dir)
    with pytest.raises(OtfuseError, match="does not exist"):
        D.load_dataset(f"imagefolder:{tmp_path / 'none'}", tmp_data_dir)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OtfuseError, match="is a file, not a directory"):
        D.load_dataset("digits", blocker / "sub")


def test_augmentation_crops_and_flips_each_image_with_its_own_draw():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    out = D.augment_batch(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    padded = D.augment_batch(x.repeat(64, 1, 1, 1), torch.Generator().manual_seed(0), pad=1)
    assert padded.shape == (128, 1, 4, 4) and len({tuple(p.flatten().tolist()) for p in padded}) > 4
    again = D.augment_batch(x.repeat(64, 1, 1, 1), torch.Generator().manual_seed(0), pad=1)
    assert torch.equal(padded, again)


def test_batches_are_normalised_and_seeded():
    x = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(10)
    b1 = [yb for _, yb in D.batches(x, y, 4, ((0.5,), (0.25,)), seed=1)]
    b2 = [yb for _, yb in D.batches(x, y, 4, ((0.5,), (0.25,)), seed=1)]
    assert all(torch.equal(p, q) for p, q in zip(b1, b2)) and sorted(torch.cat(b1).tolist()) == list(range(10))
    xb, _ = next(D.batches(x, y, 10, ((0.5,), (0.25,))))
    assert torch.allclose(xb, (x.float() / 255 - 0.5) / 0.25)


def _png_tree(root, classes, per_split=(2, 1), seed=0):
    """ImageFolder PNGs of 32x32 under one top folder, as the lossless CIFAR-100 copy lays them out; returns
    {(split, class): [images]} in file order."""
    rng = np.random.default_rng(seed)
    images = {}
    for split, n in zip(("train", "test"), per_split):
        for c in classes:
            folder = root / "top" / split / c
            folder.mkdir(parents=True)
            images[split, c] = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
            for i, im in enumerate(images[split, c]):
                Image.fromarray(im).save(folder / f"{i:04d}.png")
    (root / "top" / "classes.txt").write_text("\n".join(classes))
    return images


def _archive(root, name):
    with tarfile.open(root.parent / name, "w:xz") as tar:
        tar.add(root / "top", arcname="top")
    return root.parent / name


def test_classes_named_train_and_test_keep_their_labels(tmp_path, tmp_data_dir):
    images = _png_tree(tmp_path / "src", ["apple", "test", "train"])
    d = D.load_dataset(f"imagefolder:{_archive(tmp_path / 'src', 'odd.tar.xz')}", tmp_data_dir, val_size=0)
    assert d.classes == ["apple", "test", "train"]
    # the test split's class "train" and the train split's class "test" are classes, not splits
    assert d.test_y.tolist() == [0, 1, 2] and d.train_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(d.test_x[2], torch.from_numpy(images["test", "train"][0]).permute(2, 0, 1))
    assert torch.equal(d.train_x[3], torch.from_numpy(images["train", "test"][1]).permute(2, 0, 1))


def test_cifar100_uses_a_local_copy_before_a_download(tmp_path, tmp_data_dir, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", _no_internet)
    _png_tree(tmp_path / "src", D.CIFAR100_CLASSES, (1, 1))
    archive = _archive(tmp_path / "src", D.CIFAR100_ARCHIVE)
    named = D.load_dataset(f"cifar100:{archive}", tmp_data_dir, val_size=10)
    assert named.classes == D.CIFAR100_CLASSES and named.test_y.tolist() == list(range(100)) and named.slug == "cifar100"
    with pytest.raises(OtfuseError, match="cannot download cifar100.*cifar100:PATH"):  # none in the data dir: a download
        D.load_dataset("cifar100", tmp_data_dir)
    (tmp_data_dir / D.CIFAR100_ARCHIVE).symlink_to(archive)
    found = D.load_dataset("cifar100", tmp_data_dir, val_size=10)  # the archive in the data dir, no download
    assert torch.equal(found.train_x, named.train_x) and torch.equal(found.val_y, named.val_y)
    _png_tree(tmp_path / "other", ["cat", "dog"])
    with pytest.raises(OtfuseError, match="2 classes, not CIFAR-100's 100 fine labels.*imagefolder:"):
        D.load_dataset(f"cifar100:{tmp_path / 'other' / 'top'}", tmp_data_dir)


def test_cifar100_pickles_and_the_png_copy_are_the_same_data_and_named_alike(tmp_path, tmp_data_dir, monkeypatch):
    """torchvision's pickles hold each split interleaved; the PNG copy numbers a class's files by their rank in that
    order. Read by class, both give the same arrays, the same validation split and the same digest; a digest in
    KNOWN_CONTENT names the data whatever path it was loaded from."""
    images = _png_tree(tmp_path / "src", D.CIFAR100_CLASSES, (3, 1))
    folder = tmp_data_dir / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 3), ("test", 1)):
        order = [(c, i) for i in range(n) for c in range(100)]  # interleaved, as the originals are
        flat = [images[split, D.CIFAR100_CLASSES[c]][i].transpose(2, 0, 1).reshape(-1) for c, i in order]
        with open(folder / split, "wb") as fh:
            pickle.dump({"data": np.stack(flat), "fine_labels": [c for c, _ in order]}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": D.CIFAR100_CLASSES}, fh)
    pickles = D.load_dataset("cifar100", tmp_data_dir, val_size=20)
    png = D.load_dataset(f"imagefolder:{tmp_path / 'src' / 'top'}", tmp_data_dir, val_size=20)
    for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(pickles, k), getattr(png, k)), k
    assert pickles.digest == png.digest and len(png.digest) == 32
    assert png.slug == "imagefolder-top" and pickles.slug == "cifar100"
    monkeypatch.setitem(D.KNOWN_CONTENT, png.digest, "cifar100")
    assert D.load_dataset(f"imagefolder:{tmp_path / 'src' / 'top'}", tmp_data_dir, val_size=20).slug == "cifar100"


class _Planted:
    """What an attacker plants in the data dir: unpickling it would create a file (plain pickle calls open)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_a_planted_cifar_pickle_runs_no_code(name, tmp_path, tmp_data_dir):
    folder = tmp_data_dir / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir()
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"] if name == "cifar10" else ["train", "test", "meta"]
    marker = tmp_path / "pwned"
    for f in files:
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": _Planted(marker), "labels": [0], "fine_labels": [0]}, fh)
    with pytest.raises(OtfuseError, match=r"asks to run (builtins|_?io)\.open, which CIFAR's files never do"):
        D.load_dataset(name, tmp_data_dir)
    assert not marker.exists()


def test_images_otfuse_cannot_read_right_are_one_clear_error(tmp_path, tmp_data_dir, monkeypatch):
    root = tmp_path / "imgs"
    _image_tree(root)
    deep = np.full((6, 6), 40000, np.uint16)  # a 16-bit PNG: read as 8-bit it would be white
    Image.fromarray(deep).save(root / "train" / "cat" / "deep.png")
    with pytest.raises(OtfuseError, match="deep.png holds I;16 pixels, not 8-bit ones"):
        D.load_dataset(f"imagefolder:{root}", tmp_data_dir)
    (root / "train" / "cat" / "deep.png").unlink()
    monkeypatch.setattr(D, "MAX_PIXELS", 30)
    with pytest.raises(OtfuseError, match="is 6 x 6 pixels, more than otfuse reads"):
        D.load_dataset(f"imagefolder:{root}", tmp_data_dir)


def test_an_archive_member_that_cannot_be_an_image_is_never_read(tmp_path, tmp_data_dir, monkeypatch):
    root = tmp_path / "imgs"
    _image_tree(root)
    (root / "notes.bin").write_bytes(b"x" * 5000)  # outside train/ and test/: skipped, and not even read
    archive = tmp_path / "imgs.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="top")
    read = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read.append(m.name) or real(self, m))
    monkeypatch.setattr(D, "MAX_FILE_BYTES", 4096)
    assert D.load_dataset(f"imagefolder:{archive}", tmp_data_dir, val_size=1).classes == ["cat", "dog"]
    assert read and not any("notes" in n for n in read)
    (root / "train" / "dog" / "huge.png").write_bytes(b"x" * 5000)
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(root, arcname="top")
    with pytest.raises(OtfuseError, match="huge.png is 5,000 bytes, more than any image otfuse reads"):
        D.load_dataset(f"imagefolder:{archive}", tmp_data_dir)


def test_class_names_that_differ_only_in_unicode_form_are_one_clear_error(tmp_path, tmp_data_dir):
    import unicodedata

    root = tmp_path / "imgs"
    _image_tree(root)
    for form in ("NFC", "NFD"):
        for split in ("train", "test"):
            folder = root / split / unicodedata.normalize(form, "café")
            folder.mkdir()
            Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(folder / "0.png")
    with pytest.raises(OtfuseError, match="look the same but are written in two Unicode forms"):
        D.load_dataset(f"imagefolder:{root}", tmp_data_dir)


def test_a_deleted_working_directory_is_one_line(tmp_path):
    import subprocess
    import sys

    gone = tmp_path / "gone"
    gone.mkdir()
    code = f"import os, sys; os.chdir({str(gone)!r}); os.rmdir({str(gone)!r}); from otfuse.entry import main; "
    code += "sys.exit(main(['evaluate', 'x.pt']))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().startswith("otfuse: error: the current folder no longer exists")


def test_a_fifo_or_an_unreadable_folder_inside_an_image_folder_is_one_clear_error(tmp_path, monkeypatch):
    """HANG: a FIFO at train/b/zz.png blocked `otfuse train` forever (the walk opened every name it listed); SILENT: a
    folder os.walk cannot read was skipped, and its class vanished from the data."""
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / split / c / "0.png")
    os.mkfifo(root / "train" / "b" / "zz.png")
    with pytest.raises(OtfuseError, match=r"zz.png is not a regular file"):
        D.load_dataset(f"imagefolder:{root}", tmp_path / "data")
    (root / "train" / "b" / "zz.png").unlink()

    def walk(top, onerror=None, **kw):  # as os.walk does with a folder it may not list (root reads every folder)
        onerror(PermissionError(13, "Permission denied", str(root / "train" / "b")))
        yield from ()

    monkeypatch.setattr(os, "walk", walk)
    with pytest.raises(OtfuseError, match=r"train/b cannot be read \(Permission denied\)"):
        D.load_dataset(f"imagefolder:{root}", tmp_path / "data2")


def _folder(root: Path, pixels: dict[str, np.ndarray] | None = None) -> Path:
    """train/ and test/ with classes a and b, one 8 x 8 PNG each (or the given images, by relative path)."""
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 if c == "a" else 200, dtype=np.uint8)).save(root / split / c / "0.png")
    for rel, x in (pixels or {}).items():
        Image.fromarray(x).save(root / rel)
    return root


def test_an_image_replaced_by_one_of_the_same_size_and_time_is_read_again(tmp_path):
    """The cache key held path, size and modification time: a same-size replacement with its time copied back kept
    the old pixels. Its inode and change time (which no user sets back) are in the key now."""
    root = _folder(tmp_path / "imgs")
    img = root / "train" / "a" / "0.png"
    before = D.load_dataset(f"imagefolder:{root}", tmp_path / "data").train_x.clone()
    st = img.stat()
    other = tmp_path / "other.png"
    Image.fromarray(np.full((8, 8, 3), 41, dtype=np.uint8)).save(other)
    assert other.stat().st_size == st.st_size
    img.write_bytes(other.read_bytes())
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = D.load_dataset(f"imagefolder:{root}", tmp_path / "data").train_x
    assert 40 in before.unique().tolist() and 41 in after.unique().tolist()


def test_an_archive_with_two_members_of_one_name_is_refused(tmp_path):
    root = _folder(tmp_path / "imgs")
    archive = tmp_path / "twice.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="data")
        tar.add(root / "train" / "a" / "0.png", arcname="data/train/a/0.png")  # appended: tar keeps both
    with pytest.raises(OtfuseError, match="holds two members named data/train/a/0.png"):
        D.load_dataset(f"imagefolder:{archive}", tmp_path / "data")


def test_a_photo_is_read_as_its_exif_orientation_shows_it(tmp_path):
    """A camera's JPEG stores its pixels as the sensor read them and says how to turn them (EXIF orientation 6: a
    quarter turn); a viewer shows it turned, and so does otfuse."""
    root = _folder(tmp_path / "imgs")
    x = np.zeros((8, 8, 3), dtype=np.uint8)
    x[0, :] = 255  # a bright top row, stored; shown turned a quarter clockwise it is the right column
    exif = Image.Exif()
    exif[D.EXIF_ORIENTATION] = 6
    for split in ("train", "test"):
        (root / split / "a" / "0.png").unlink()
        Image.fromarray(x).save(root / split / "a" / "0.png", exif=exif.tobytes())
    data = D.load_dataset(f"imagefolder:{root}", tmp_path / "data")
    shown = data.train_x[data.train_y == 0][0].float().mean(0)
    assert shown[:, -1].min() > 200 and shown[0, :-1].max() < 50


def test_an_entry_that_cannot_be_looked_at_is_one_clear_error(tmp_path, monkeypatch):
    """A folder readable but not searchable lists names whose stat fails (PermissionError): one line, not a
    traceback (root may look at everything, so the error is raised as the file system would)."""
    root = _folder(tmp_path / "imgs")

    def fingerprint(paths):
        raise PermissionError(13, "Permission denied", str(root / "train" / "a" / "0.png"))

    monkeypatch.setattr(D, "_fingerprint", fingerprint)
    with pytest.raises(OtfuseError, match=r"train/a/0.png cannot be read \(Permission denied\)"):
        D.load_dataset(f"imagefolder:{root}", tmp_path / "data")
