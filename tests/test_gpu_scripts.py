"""The GPU scripts work on their first call: the check fails on a device-dependent map, the carried wheels are
complete and unpack without pip, and the dry run of bench/gpu/run.sh writes everything the GPU run writes."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from otfuse.checkpoints import load_checkpoint
from otfuse.evaluate import accuracy
from otfuse.fusion import fuse
from otfuse.precision import Precision

from support import bench_module, config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def records(trained, tmp_path_factory):
    """A saved float32 fusion record of the two digits parents, as bench/gpu_check.py saves one per device."""
    check = bench_module("gpu_check")
    models, data, _, _ = trained
    fusion = fuse(models, data.train_x, data.norm, config(n_images=200, refit_n_images=200, bn_batches=4))
    record = check.fusion_record(fusion, accuracy(fusion.fused, data.test_x, data.test_y, data.norm, Precision.FP32))
    folder = tmp_path_factory.mktemp("records")
    torch.save(record, folder / "cpu.pt")
    return check, record, folder


def test_gpu_check_exits_nonzero_when_a_device_gives_another_map(records, capsys):
    check, record, folder = records
    ref = str(folder / "cpu.pt")
    assert check.main(["--compare", ref, ref]) == 0
    key, perm = next((k, v) for k, v in record["maps"].items() if v.dtype == torch.long and len(v) > 1)
    swapped = perm.clone()
    swapped[[0, 1]] = perm[[1, 0]]
    torch.save({**record, "maps": {**record["maps"], key: swapped}}, folder / "cuda.pt")
    capsys.readouterr()
    assert check.main(["--compare", ref, str(folder / "cuda.pt")]) == 1
    assert f"map {key} differs in 2 of {len(perm)} channels" in capsys.readouterr().out


def test_gpu_check_exits_nonzero_when_the_weights_or_accuracy_drift(records, capsys):
    check, record, folder = records
    name = next(k for k, v in record["state"].items() if v.ndim == 4)
    state = {**record["state"], name: record["state"][name] * 1.01}
    torch.save({**record, "state": state, "test_accuracy": record["test_accuracy"] - 2.0}, folder / "drift.pt")
    assert check.main(["--compare", str(folder / "cpu.pt"), str(folder / "drift.pt")]) == 1
    out = capsys.readouterr().out
    assert f"tensor {name} differs by" in out and "test accuracy" in out
    (folder / "junk.pt").write_bytes(b"not a record")
    assert check.main(["--compare", str(folder / "cpu.pt"), str(folder / "junk.pt")]) == 2


def _wheel(folder: Path, name: str, version: str, requires: list[str], files: dict[str, bytes] | None = None) -> Path:
    """A minimal wheel: its METADATA with Requires-Dist lines, and the given files."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        for arcname, blob in (files or {}).items():
            z.writestr(arcname, blob)
    return path


def test_the_wheel_check_names_every_dependency_the_image_lacks(tmp_path):
    wheels = bench_module("gpu/wheels")
    folder = tmp_path / "whl"
    folder.mkdir()
    _wheel(folder, "pot", "0.9.6", ["numpy>=1.16", "scipy>=1.6"])
    _wheel(folder, "optuna", "5.1.0", ["alembic>=1.5", "colorlog", "tomli; python_version < '3.11'", "sphinx; extra == 'docs'"])
    _wheel(folder, "colorlog", "6.12.0", [])
    pinned, image = tmp_path / "wheels.txt", tmp_path / "image.txt"
    pinned.write_text("# comment\npot==0.9.6\noptuna==5.1.0\ncolorlog\nsklearn-missing==1.0\n")
    image.write_text("numpy\nscipy\n")
    problems = wheels.missing(folder, pinned, image)
    assert any("optuna-5.1.0-py3-none-any.whl needs alembic>=1.5" in p for p in problems)
    assert any("sklearn-missing: pinned" in p for p in problems)
    assert not any("tomli" in p or "sphinx" in p or "numpy" in p for p in problems), problems  # markers, extras, the image
    _wheel(folder, "alembic", "1.20.1", ["SQLAlchemy>=2.0"])
    _wheel(folder, "alembic", "1.19.0", [])
    problems = wheels.missing(folder, pinned, image)
    assert any(p.startswith("alembic: 2 wheels") for p in problems) and any("needs SQLAlchemy>=2.0" in p for p in problems)


def test_the_wheels_unpack_into_a_site_without_pip(tmp_path):
    wheels = bench_module("gpu/wheels")
    folder = tmp_path / "whl"
    folder.mkdir()
    files = {
        "tiny_pkg/__init__.py": b"VALUE = 7\n",
        "tiny_pkg-1.0.data/purelib/tiny_extra.py": b"EXTRA = 8\n",
        "tiny_pkg-1.0.data/scripts/tool": b"#!/bin/sh\n",
        "../escape.py": b"BAD = 1\n",
    }
    _wheel(folder, "tiny_pkg", "1.0", [], files)
    site = tmp_path / "site"
    assert wheels.main(["install", str(folder), str(site)]) == 0
    run = subprocess.run(
        [sys.executable, "-c", "import tiny_pkg, tiny_extra; print(tiny_pkg.VALUE + tiny_extra.EXTRA)"],
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
    )
    assert run.stdout.strip() == "15", run.stderr
    assert not (tmp_path / "escape.py").exists() and not list(site.rglob("tool"))


def _image_archive(path: Path, classes: int = 10, train: int = 30, test: int = 10) -> None:
    """A small CIFAR-like ImageFolder .tar.xz of 16 x 16 JPEGs whose colour tells the class (learnable, tiny)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:xz") as tar:
        for split, n in (("train", train), ("test", test)):
            for c in range(classes):
                for i in range(n):
                    pixels = rng.integers(0, 60, (16, 16, 3)) + np.array([25 * c, 250 - 25 * c, 120])
                    buf = io.BytesIO()
                    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/class{c}/{i:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "GPU_DATA": str(tmp_path / "gpu-data"), **env}
    return subprocess.run([str(ROOT / "bench" / "gpu" / "run.sh"), *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_dry_run_writes_what_the_gpu_run_writes(tmp_path):
    """bench/gpu/run.sh --device cpu --tiny: the carried data verified, two seeds trained on it, both fusion scripts,
    the fp16 checkpoints in parts that join to a loadable checkpoint, the seconds of every stage."""
    data = tmp_path / "gpu-data"
    data.mkdir()
    _image_archive(data / "cifar10-jpeg.tar.xz")
    digest = hashlib.sha256((data / "cifar10-jpeg.tar.xz").read_bytes()).hexdigest()
    (data / "SHA256SUMS").write_text(f"{digest}  cifar10-jpeg.tar.xz\n")
    out = tmp_path / "out"
    run = _run(tmp_path, "--device", "cpu", "--tiny", "--stages", "install,train,fuse", OUT=str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    stages = (out / "stages.csv").read_text().split()
    assert stages[0] == "stage,seconds,status" and [s.split(",")[0] for s in stages[1:]] == ["install", "train", "fuse"]
    assert all(s.endswith(",0") for s in stages[1:])
    results = {p.name for p in (out / "results").iterdir()}
    assert (
        {"summary.md"} <= results
        and any(n.endswith("_activation.csv") for n in results)
        and any(n.endswith("_weight.csv") for n in results)
    )
    for seed in (0, 1):
        parts = sorted((out / "checkpoints").glob(f"seed{seed}-fp16.pt.part-*"))
        assert parts and all(p.stat().st_size <= 16 * 2**20 for p in parts)
        joined = b"".join(p.read_bytes() for p in parts)
        assert hashlib.sha256(joined).hexdigest() in (out / "checkpoints" / f"seed{seed}-fp16.pt.sha256").read_text()
        (tmp_path / "joined.pt").write_bytes(joined)
        model, meta, ckpt = load_checkpoint(tmp_path / "joined.pt")
        assert "optimizer" not in ckpt and meta["width"] == 8 and next(model.parameters()).dtype == torch.float32
    assert "run.sh: done" in (out / "run.log").read_text()


def test_the_run_stops_at_once_when_the_carried_data_was_damaged(tmp_path):
    data = tmp_path / "gpu-data"
    data.mkdir()
    (data / "cifar10-jpeg.tar.xz").write_bytes(b"damaged in transfer")
    (data / "SHA256SUMS").write_text(f"{'0' * 64}  cifar10-jpeg.tar.xz\n")
    run = _run(tmp_path, "--device", "cpu", "--tiny", OUT=str(tmp_path / "out"))
    assert run.returncode == 1 and "does not match its checksum: run bench/gpu/prepare.sh again" in run.stdout
    stage, _seconds, status = (tmp_path / "out" / "stages.csv").read_text().splitlines()[1].split(",")
    assert (stage, status) == ("install", "1") and len((tmp_path / "out" / "stages.csv").read_text().splitlines()) == 2


def test_the_scripts_refuse_a_bad_option_in_one_line(tmp_path):
    for script, bad in (("run.sh", "--dataset imagenet"), ("run.sh", "--device tpu"), ("prepare.sh", "--dataset svhn")):
        run = subprocess.run([str(ROOT / "bench" / "gpu" / script), *bad.split()], capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and bad.split()[1] in run.stderr, (script, run.stderr)
