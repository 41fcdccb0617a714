"""Atomic file writes and safe checkpoint loading.

Everything otfuse writes goes to a temporary file in the target folder first and is then
renamed over the target, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from otfuse.errors import OtfuseError


def writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check it can be written, or raise one clear error."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise OtfuseError(f"cannot write to directory {path} ({exc.strerror or exc}); choose a writable directory") from None
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_csv(path: str | Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Rows as CSV with a header (columns: `fieldnames`, or the first row's keys), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write(path: str | Path, write) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; a missing, truncated or foreign file is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise OtfuseError(f"{what} {path} does not exist; check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt zips and unpickling
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OtfuseError(f"{what} {path} is corrupt or truncated ({first[:120]}); re-create it") from None
