#!/usr/bin/env python
"""Trained checkpoints made small enough to come back from the GPU machine: half precision, in parts.

    python bench/gpu/pack.py OUT/checkpoints CK/.../seed0.pt CK/.../seed1.pt
    cat seed0-fp16.pt.part-* > seed0-fp16.pt && sha256sum -c seed0-fp16.pt.sha256   # here, to join them

Each checkpoint's floating-point weights are stored as float16 with its metadata, without optimizer state
(as the shared parents in ../shared/checkpoints are; `load_checkpoint` loads them into a float32 model),
then split into parts of at most 15 MiB (the device tool returns files under 16 MiB), with the sha256 of
the whole file. The per-epoch log (.csv) is copied beside.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
from pathlib import Path

import torch

from otfuse.checkpoints import weights_digest
from otfuse.storage import load_torch

PART_BYTES = 15 * 2**20


def half_copy(ckpt: dict) -> bytes:
    """The checkpoint's bytes with float16 weights, its metadata and nothing else."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    meta = {**ckpt["meta"], "weights_digest": weights_digest(state)}
    buf = io.BytesIO()
    torch.save({"state_dict": state, "meta": meta}, buf)
    return buf.getvalue()


def pack(path: Path, out: Path) -> list[Path]:
    blob = half_copy(load_torch(path))
    name = f"{path.stem}-fp16.pt"
    parts = []
    for i in range(0, len(blob), PART_BYTES):
        part = out / f"{name}.part-{i // PART_BYTES:02d}"
        part.write_bytes(blob[i : i + PART_BYTES])
        parts.append(part)
    (out / f"{name}.sha256").write_text(f"{hashlib.sha256(blob).hexdigest()}  {name}\n")
    if path.with_suffix(".csv").is_file():
        shutil.copyfile(path.with_suffix(".csv"), out / f"{path.stem}.csv")
    return parts


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for p in argv[1:]:
        parts = pack(Path(p), out)
        print(f"pack.py: {p} -> {len(parts)} part(s) in {out}, {sum(q.stat().st_size for q in parts) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
