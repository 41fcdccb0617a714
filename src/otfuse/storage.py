"""Atomic file writes and safe checkpoint loading.

Everything otfuse writes goes to a temporary file in the target folder first and is then
renamed over the target, so an interrupted run never leaves a half-written file. A temporary
file left by a killed writer (its process is gone) is removed by the next write to that folder.
Written files get the permissions the umask allows, like any other file the user creates.

Every command's outputs follow one rule (`check_outputs`): an existing file is replaced only when
it is this command's own earlier result for the same inputs, or with --overwrite; an output is
never an input, the config, or another output of the same run. A command holds an exclusive lock
(`output_lock`: flock on a `.<name>.lock` file beside the output, which the kernel releases when
the process ends) while it writes, so two processes writing one output cannot both succeed.
"""

from __future__ import annotations

import csv
import errno
import fcntl
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

NAME_MAX = 255  # bytes in one file name, on every file system otfuse writes to
TMP_PREFIX = ".otfuse-tmp."  # a writer's temporary file: .otfuse-tmp.<name>.<pid>-<random>.tmp; no one else's is ever removed
_TMP = re.compile(r"^\.otfuse-tmp\..+\.(\d+)-[^.]+\.tmp$")


def writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check it can be written, or raise one clear error."""
    path = Path(path).expanduser()
    check_name(path)
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
    check_name(path)
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
    outputs: dict[str, str | Path],
    inputs: dict[str, str | Path],
    overwrite: bool = False,
    own: Callable[[Path], bool] = lambda _: False,
    fix: str = "choose a new path, or add --overwrite to replace it",
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
            raise OtfuseError(f"{what} {path} already exists and is not this command's earlier result for these inputs; {fix}")


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
    """An exclusive lock the kernel holds for this process (flock on `.<name>.lock`): released when the process ends,
    however it ends, so a crashed writer never blocks the next, and no process id is ever guessed at."""
    writable_dir(path.parent)
    lock = path.parent / short_name(f".{path.name}", ".lock")
    while True:
        fd = _open_lock(lock, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise OtfuseError(
                f"{path} is being written by another otfuse process (pid {holder or '?'}); wait for it to finish "
                "or choose another output path"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a lock file its last holder removed meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _open_lock(lock: Path, path: Path) -> int:
    """The lock file, opened without following a symbolic link, and only if it is one otfuse made: a regular file
    with no other name, holding nothing or a process id. Anything else at that name (a link to a user's file, a
    hard link, a FIFO, a file with other content) is refused, never truncated or written."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except IsADirectoryError:
        raise OtfuseError(f"{lock}, where otfuse keeps the lock of {path}, is a directory; remove it") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OtfuseError(
                f"{lock}, where otfuse keeps the lock of {path}, is a symbolic link, which otfuse never writes through; remove it"
            ) from None
        raise OtfuseError(f"cannot take the lock {lock} for {path} ({exc.strerror}); choose a writable folder") from None
    info = os.fstat(fd)
    held = os.pread(fd, 64, 0) if stat.S_ISREG(info.st_mode) else b""
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or not re.fullmatch(rb"\d*", held):
        os.close(fd)
        raise OtfuseError(
            f"{lock}, where otfuse keeps the lock of {path}, is not a lock otfuse made (another kind of file, a second "
            "name of another file, or other content); move it away"
        )
    return fd


def short_name(stem: str, suffix: str, limit: int = NAME_MAX) -> str:
    """`stem + suffix`, with the stem cut and a hash of it added where the whole would pass the file system's name limit."""
    if len(os.fsencode(stem + suffix)) <= limit:
        return stem + suffix
    digest = hashlib.sha1(os.fsencode(stem)).hexdigest()[:12]
    return os.fsencode(stem)[: limit - len(os.fsencode(suffix)) - 14].decode(errors="ignore") + "~" + digest + suffix


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
    return "-".join(Path(p).stem for p in paths) + "-" + hashlib.sha256(os.fsencode(joined)).hexdigest()[:8]


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


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files of killed writers in `folder`; returns how many went. A writer holds a lock on its
    temporary file (flock) as long as it lives, so only a dead one's is taken, whatever its process id says."""
    gone = 0
    for p in folder.glob(f"{TMP_PREFIX}*.tmp"):
        if not _TMP.match(p.name):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its writer is alive
        finally:
            os.close(fd)
        p.unlink(missing_ok=True)
        gone += 1
    return gone


def atomic_write(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    check_name(path)
    if path.is_dir():
        raise OtfuseError(f"{path} is a directory; give a file path")
    writable_dir(path.parent)
    remove_stale_temporaries(path.parent)
    tmp = None
    try:
        prefix = short_name(f"{TMP_PREFIX}{path.name}", f".{os.getpid()}-", NAME_MAX - 14)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # held while this process lives: its temporary file is never taken for stale
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result follows the umask
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise OtfuseError(
                f"cannot write {path} ({exc.strerror}); free space or choose another path (nothing was written there)"
            ) from None
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
            raise OtfuseError(f"cannot write {path}: its name is too long for the file system; choose a shorter one") from None
        if isinstance(exc, RuntimeError) and any(t in str(exc) for t in ("file write failed", "No space left", "failed writing")):
            raise OtfuseError(
                f"cannot write {path} (no space left on the device); free space or choose another path (nothing was written there)"
            ) from None
        raise


def check_name(path: Path) -> None:
    """One clear error for a path with a name longer than the file system allows (before anything is written)."""
    long = [part for part in path.parts if len(os.fsencode(part)) > NAME_MAX]
    if long:
        raise OtfuseError(
            f"{path}: the name {long[0][:40]}... is {len(os.fsencode(long[0]))} bytes, more than the {NAME_MAX} a file "
            "system allows; choose a shorter name"
        )


def save_torch(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_torch(path: str | Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; a missing, truncated or foreign file is one clear error."""
    path = Path(path)
    check_name(path)
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
