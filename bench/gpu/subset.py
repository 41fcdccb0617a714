#!/usr/bin/env python
"""A small ImageFolder archive cut from a large one, for the dry run of bench/gpu/run.sh (--tiny).

    python bench/gpu/subset.py .gpu-data/cifar10-jpeg.tar.xz /tmp/tiny.tar.xz --per-class 20

Streams the .tar.xz once and keeps the first N files of each train/<class>/ and test/<class>/ folder (a
common top folder above train/ and test/ is kept as it is); the images themselves are copied byte for
byte, so the dry run reads the same format through the same loader as the real run.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from collections import Counter


def subset(src: str, out: str, per_class: int) -> int:
    kept, seen = 0, Counter()
    with tarfile.open(src, "r:xz") as tar, tarfile.open(out, "w:xz") as dst:
        for member in tar:
            if not member.isfile():
                continue
            parts = member.name.split("/")
            split = next((i for i, p in enumerate(parts) if p in ("train", "test")), None)
            if split is None or len(parts) != split + 3:
                continue
            folder = "/".join(parts[: split + 2])
            if seen[folder] < per_class:
                seen[folder] += 1
                dst.addfile(member, io.BytesIO(tar.extractfile(member).read()))
                kept += 1
    return kept


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--per-class", type=int, default=20)
    args = p.parse_args(argv)
    print(f"subset.py: {subset(args.src, args.out, args.per_class)} images of {args.src} in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
