"""Atomic file writes and safe checkpoint loading.

Everything otfuse writes goes to a temporary file in the target folder first and is then
renamed over the target, so an interrupted run never leaves a half-written file. A temporary
file left by a killed writer (its process is gone) is removed by the next write to that folder.
Written files get the permissions the umask allows, like any other file the user creates.

Every command's outputs follow one rule (`check_outputs`): an existing file is replaced only when
it is this command's own earlier result for the same inputs, or with --overwrite; an output is
never an input, the config, or another output of the same run. A command holds an exclusive lock
(`output_lock`, a `.<name>.lock` file beside the output naming its process) while it writes, so
two processes writing one output cannot both succeed.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from otfuse.errors import OtfuseError

_TMP = re.compile(r"^\..+\.(\d+)-[^.]+\.tmp$")  # .<name>.<pid>-<random>.tmp


def writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check it can be written, or raise one clear error."""
    path = Path(path).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OtfuseError(f"{folder} is a file, not a directory; choose a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise OtfuseError(f"cannot write to directory {path} ({exc.strerror or exc}); choose a writable directory") from None
    return path


def regular_file(path: str | Path, what: str, missing_ok: bool = False) -> Path | None:
    """`path` as a regular file to read, or one clear error naming what it is instead: missing (None with
    `missing_ok`), a directory, a symbolic-link loop, or not a regular file (a FIFO would block the read forever, a
    device such as /dev/zero never end)."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        if missing_ok and not path.is_symlink():
            return None
        raise OtfuseError(f"{what} {path} does not exist; check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OtfuseError(f"{what} {path} is a loop of symbolic links; give the file itself") from None
        raise OtfuseError(f"{what} {path} cannot be read ({exc.strerror or exc}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise OtfuseError(f"{what} {path} is a directory; give a file")
    if not stat.S_ISREG(st.st_mode):
        raise OtfuseError(f"{what} {path} is not a regular file (a pipe, socket or device); give a file")
    return path


def writable_file(path: str | Path, what: str) -> Path:
    """Check, before any work and without creating anything, that `path` can be written as a file:
    not a directory, and its nearest existing folder writable (missing folders are made when writing)."""
    path = Path(path).expanduser()
    if path.is_dir() or str(path).endswith(os.sep):
        raise OtfuseError(f"{what} {path} is a directory; give a file path such as {path / 'model.pt'}")
    for folder in path.parents:
        if folder.exists():
            if not folder.is_dir():
                raise OtfuseError(f"{folder} is a file, not a directory; choose another path for {what} {path}")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OtfuseError(f"cannot write to directory {folder} (permission denied); choose a writable path for {what}")
            break
    return path


def check_outputs(
    outputs: dict[str, str | Path], inputs: dict[str, str | Path], overwrite: bool = False, own: Callable[[Path], bool] = lambda _: False
) -> None:
    """Refuse, before any work, an output (`{what: path}`) that is an input (`{what: path}`: checkpoints, the
    config), another output of the same run, or an existing file that is neither this command's earlier
    result for the same inputs (`own(path)`) nor replaceable by `overwrite`."""
    seen: dict[Path, str] = {}
    ins = {Path(p).expanduser().resolve(): what for what, p in inputs.items() if p}
    for what, path in outputs.items():
        if not path:
            continue
        p = Path(path).expanduser()
        writable_file(p, what)
        key = p.resolve()
        if key in ins:
            raise OtfuseError(f"{what} {path} is also {ins[key]}; choose another path (inputs are never overwritten)")
        if key in seen:
            raise OtfuseError(f"{what} {path} is also {seen[key]} of this run; choose paths that differ")
        seen[key] = what
        if p.exists() and not overwrite and not own(p):
            raise OtfuseError(
                f"{what} {path} already exists and is not this command's earlier result for these inputs; "
                "choose a new path, or add --overwrite to replace it"
            )


@contextmanager
def output_lock(*paths: str | Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside each output while writing it: a second process that wants one of them gets
    one clear error instead of both succeeding. A lock left by a process that is gone is taken over."""
    with ExitStack() as stack:
        for path in sorted({Path(p).expanduser().resolve() for p in paths if p}):
            stack.enter_context(_locked(path))
        yield


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    writable_dir(path.parent)
    lock = path.parent / f".{path.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise OtfuseError(
                    f"{path} is being written by another otfuse process (pid {pid}); wait for it to finish "
                    f"or choose another output path (a lock left by a crash: remove {lock})"
                ) from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise OtfuseError(f"cannot take the lock {lock} for {path}; remove it if no otfuse process is running")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def identity(path: str | Path) -> str:
    """A short content hash of a file: what names results and studies, so that two different inputs never share one."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:8]


def inputs_name(paths: list[str | Path]) -> str:
    """A results or study name for these input files: their stems, then a hash of their contents (in order), so
    a fused or fine-tuned checkpoint never shares a name with the parents whose seeds its metadata inherits."""
    joined = "-".join(identity(p) for p in paths)
    return "-".join(Path(p).stem for p in paths) + "-" + hashlib.sha256(joined.encode()).hexdigest()[:8]


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files of killed writers in `folder`; returns how many went."""
    gone = 0
    for p in folder.glob(".*.tmp"):
        m = _TMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            gone += 1
    return gone


def atomic_write(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    if path.is_dir():
        raise OtfuseError(f"{path} is a directory; give a file path")
    writable_dir(path.parent)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result follows the umask
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise OtfuseError(
                f"cannot write {path} ({exc.strerror}); free space or choose another path (nothing was written there)"
            ) from None
        if isinstance(exc, RuntimeError) and ("file write failed" in str(exc) or "No space left" in str(exc)):
            raise OtfuseError(
                f"cannot write {path} (no space left on the device); free space or choose another path (nothing was written there)"
            ) from None
        raise


def save_torch(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; a missing, truncated or foreign file is one clear error."""
    path = Path(path)
    if path.is_dir():
        raise OtfuseError(f"{what} {path} is a directory; give the .pt file inside it")
    regular_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt zips, pickles and code it refuses to run
        if isinstance(exc, MemoryError):
            raise
        text = str(exc)
        if "Weights only load failed" in text and ("GLOBAL" in text or "global" in text):
            raise OtfuseError(
                f"{what} {path} holds objects other than tensors and plain data, which otfuse does not load "
                "(they could run code); give a checkpoint written by otfuse"
            ) from None
        if "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text or isinstance(exc, EOFError):
            reason = "not a complete PyTorch file"
        elif "Weights only load failed" in text:
            reason = "not a PyTorch checkpoint"
        else:
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            reason = " ".join(first.split()[:12])
        raise OtfuseError(f"{what} {path} is corrupt or truncated ({reason}); re-create it") from None
