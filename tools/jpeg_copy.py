#!/usr/bin/env python
"""A JPEG copy of an image dataset, in the ImageFolder layout, as one reproducible .tar.xz.

    python tools/jpeg_copy.py imagefolder:../shared/data/cifar100-png.tar.xz .gpu-data/cifar100-jpeg.tar.xz

Every image of the train and test splits, read by otfuse's own loader (any dataset name it knows), is
written once as a JPEG (quality 75, 4:2:0 chroma subsampling: the settings of the CIFAR-10 copy in
../shared/data) under train/<class>/NNNN.jpg and test/<class>/NNNN.jpg, NNNN its rank within its class
and split. Entries are sorted, with fixed times and owners, so the same input gives the same bytes: the
sha256 printed at the end identifies the copy. The GPU machine receives at most 64 MiB per call: the
lossless CIFAR-100 archive (131 MB) does not fit, this copy (about 20 MB) does. JPEG loses detail:
label any figure measured on such a copy "(JPEG copy)".
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from otfuse.data import default_data_dir, load_dataset
from otfuse.errors import OtfuseError, run_main
from otfuse.storage import atomic_write_bytes

QUALITY = 75  # JPEG quality of the shared CIFAR-10 copy
SUBSAMPLING = 2  # PIL's code for 4:2:0 chroma subsampling
XZ_PRESET = 6  # xz's default: ten times faster than -9 on these small files, a few percent larger
MTIME = 0  # fixed entry times: the archive's bytes depend on the images only


def jpeg(image: torch.Tensor) -> bytes:
    """One (C, H, W) uint8 image as JPEG bytes (grey images stay grey)."""
    array = image.permute(1, 2, 0).numpy()
    im = Image.fromarray(array[..., 0] if array.shape[2] == 1 else np.ascontiguousarray(array))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=QUALITY, subsampling=SUBSAMPLING)
    return out.getvalue()


def entries(x: torch.Tensor, y: torch.Tensor, classes: list[str], split: str) -> list[tuple[str, bytes]]:
    """(archive name, JPEG bytes) of every image of one split, numbered within its class in the order given."""
    counts = [0] * len(classes)
    out = []
    for image, label in zip(x, y.tolist()):
        out.append((f"{split}/{classes[label]}/{counts[label]:04d}.jpg", jpeg(image)))
        counts[label] += 1
    return out


def archive(files: list[tuple[str, bytes]]) -> bytes:
    """A tar.xz of `files` (sorted by name, fixed metadata): the same files always give the same bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folders = sorted({str(Path(name).parent) for name, _ in files} | {name.split("/")[0] for name, _ in files})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        for name, blob in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blob), 0o644, MTIME
            tar.addfile(info, io.BytesIO(blob))
    return lzma.compress(raw.getvalue(), preset=XZ_PRESET)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="any dataset otfuse reads, e.g. imagefolder:../shared/data/cifar100-png.tar.xz")
    p.add_argument("out", help="the .tar.xz to write (replaced only with --overwrite)")
    p.add_argument("--data-dir", default=str(default_data_dir()), help="otfuse's dataset cache")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    def run() -> int:
        out = Path(args.out)
        if not out.name.endswith(".tar.xz"):
            raise OtfuseError(f"{out}: the copy is a .tar.xz (otfuse reads it as imagefolder:{out}.tar.xz); name it so")
        if out.exists() and not args.overwrite:
            raise OtfuseError(f"{out} exists; remove it or pass --overwrite")
        t0 = time.perf_counter()
        data = load_dataset(args.dataset, args.data_dir, val_size=0)  # every training image: none held out
        files = entries(data.train_x, data.train_y, data.classes, "train") + entries(data.test_x, data.test_y, data.classes, "test")
        blob = archive(files)
        atomic_write_bytes(out, blob)
        print(
            f"wrote {out}: {len(data.train_y)} train and {len(data.test_y)} test images of {len(data.classes)} classes, "
            f"{len(blob) / 2**20:.1f} MiB, sha256 {hashlib.sha256(blob).hexdigest()} ({time.perf_counter() - t0:.0f} s)"
        )
        return 0

    return run_main(run)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
