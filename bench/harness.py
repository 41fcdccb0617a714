"""What every bench script shares, in one place: its common options and its CSV, each row written as it finishes
and found again when the script runs again (so a killed bench resumes where it stopped).

    from harness import Table, common_options
    common_options(parser)                                  # --data-dir, --device, --out-dir
    table = Table(Path(args.out_dir) / "x.csv", key=("setting", "variant"), fields=FIELDS)
    if not table.has(setting=name, variant=v):
        table.put({"setting": name, "variant": v, ...})    # replaces the row of that key, atomically
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from otfuse.results import read_rows, upsert_rows
from otfuse.storage import atomic_write_csv
from otfuse.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
CIFAR10 = "imagefolder:../shared/data/cifar10-jpeg.tar.xz"  # the shared data (../shared/data/README.md), from the project root
CIFAR100 = "imagefolder:../shared/data/cifar100-png.tar.xz"


def common_options(p: argparse.ArgumentParser, device: str = "auto", out_dir: bool = True) -> None:
    """--data-dir, --device and (where the script writes a CSV under a name it makes) --out-dir."""
    p.add_argument("--data-dir", default=None, help="dataset cache (default: otfuse's)")
    p.add_argument("--device", default=device, help=f"default: {device}")
    if out_dir:
        p.add_argument("--out-dir", default=str(HERE), help="where the CSV goes (default: bench/)")


class Table:
    """The rows of one bench CSV, by `key` (the columns that name a measurement); `fields` orders the columns."""

    def __init__(self, path: Path, key: tuple[str, ...], fields: list[str] | tuple = ()):
        self.path, self.key, self.fields = Path(path), key, tuple(fields)

    @property
    def rows(self) -> list[dict]:
        return read_rows(self.path)

    def get(self, **key: object) -> dict | None:
        """The row whose key columns read as `key` (compared as text, as the CSV holds them), or None."""
        want = {k: str(v) for k, v in key.items()}
        return next((r for r in self.rows if all(r.get(k) == v for k, v in want.items())), None)

    def has(self, **key: object) -> bool:
        return self.get(**key) is not None

    def put(self, *rows: dict) -> None:
        """Write `rows` now, replacing those with the same key."""
        upsert_rows(self.path, list(rows), self.key, self.fields)

    def rewrite(self, rows: list[dict]) -> None:
        """The table as `rows`, in one atomic write (e.g. sorted, or without rows of models a source no longer has)."""
        atomic_write_csv(self.path, rows, list(dict.fromkeys([*self.fields, *(c for r in rows for c in r)])))


def trained(label: str, progress: bool = True, **options: object) -> Path:
    """Train (or resume, or find finished) one party of a bench: `otfuse train` with `options` (None ones left at
    their defaults) and --resume; one line naming `label` when it is ready."""
    t0 = time.perf_counter()
    path = train(TrainConfig(**{k: v for k, v in options.items() if v is not None}, resume=True), progress=progress)
    if progress:
        print(f"{label} ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    return path
