"""Files: written atomically with the umask's permissions, stale temporaries of killed writers cleaned up,
checkpoints that could run code refused, and finished results never overwritten by accident."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import otfuse.train as T
from otfuse.checkpoints import load_checkpoint, weights_digest
from otfuse.errors import OtfuseError
from otfuse.storage import atomic_write_text, load_torch
from otfuse.sweep import trained_seeds


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    import fcntl

    stale = tmp_path / ".otfuse-tmp.x.pt.12345-abc123.tmp"  # no process holds it: its writer was killed
    live = tmp_path / f".otfuse-tmp.y.pt.{os.getpid()}-abc123.tmp"  # held, as a writer holds its temporary file while it runs
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    with open(live) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        atomic_write_text(tmp_path / "z.txt", "x")
    assert not stale.exists() and live.exists()


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"meta": {}, "state_dict": {}, "payload": RunsCode()}, path)
    with pytest.raises(OtfuseError, match="could run code"):
        load_torch(path)


def _cfg(tmp_path, **kw) -> T.TrainConfig:
    return T.TrainConfig(
        **{
            "dataset": "digits",
            "width": 4,
            "batch_size": 64,
            "lr": 0.1,
            "device": "cpu",
            "epochs": 1,
            "data_dir": str(tmp_path / "data"),
            "checkpoint_dir": str(tmp_path / "ck"),
            **kw,
        }
    )


def test_a_finished_run_is_replaced_only_with_overwrite(tmp_path):
    path = T.train(_cfg(tmp_path), progress=False)
    before = path.read_bytes()
    with pytest.raises(OtfuseError, match="already exists.*--resume.*--overwrite"):
        T.train(_cfg(tmp_path, seed=0), progress=False)
    assert path.read_bytes() == before
    T.train(_cfg(tmp_path, overwrite=True, lr=0.05), progress=False)
    assert load_checkpoint(path)[1]["config"]["lr"] == 0.05


def test_seeds_are_found_by_their_metadata_and_finetuning_keeps_the_seed(trained, tmp_path):
    _, _, paths, root = trained
    folder = tmp_path / "ck" / "digits" / "resnet18-w8"
    folder.mkdir(parents=True)
    for p in paths:
        shutil.copy(p, folder / p.name)
    tuned = T.finetune(folder / "seed1.pt", folder / "seed1-ft1.pt", str(root / "data"), "cpu", batch_size=64)
    assert load_checkpoint(tuned)[1]["seed"] == 1 and load_checkpoint(tuned)[1]["kind"] == "finetuned"
    shutil.copy(tuned, folder / "seed7.pt")  # a fine-tuned model under a seed's name is still no seed
    (found,) = trained_seeds(tmp_path / "ck", None).values()
    assert [m["seed"] for _, m in found] == [0, 1]


def test_a_large_but_finite_batchnorm_variance_loads(trained, tmp_path):
    """A fusion of underfit parents can store variances of 1e6 (seen on digits at width 64): ours, not damage."""
    _, _, paths, _ = trained
    ckpt = torch.load(paths[0], weights_only=True)
    ckpt["state_dict"]["layer4.1.bn2.running_var"] = ckpt["state_dict"]["layer4.1.bn2.running_var"] * 0 + 1.3e6
    ckpt["meta"]["weights_digest"] = weights_digest(ckpt["state_dict"])  # as otfuse would have saved it
    torch.save(ckpt, tmp_path / "big.pt")
    model = load_checkpoint(tmp_path / "big.pt")[0]
    assert float(model.layer4[1].bn2.running_var.max()) == pytest.approx(1.3e6)


def test_a_held_lock_is_refused_whatever_its_pid_says_and_a_live_writers_temporary_stays(tmp_path):
    """Locks and temporary files are known held by the kernel's flock, never by guessing at a process id (another pid
    namespace, a recycled pid): a lock whose recorded pid looks dead but is held refuses; a temporary file whose pid
    looks dead but is held stays."""
    import fcntl

    from otfuse.errors import OtfuseError
    from otfuse.storage import atomic_write_text, output_lock

    lock = tmp_path / ".x.csv.lock"
    lock.write_text("999999999")
    with open(lock) as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(OtfuseError, match="is being written by another otfuse process"):
            with output_lock(tmp_path / "x.csv"):
                pass
    tmp = tmp_path / ".otfuse-tmp.y.csv.999999999-abc.tmp"
    tmp.write_text("a live writer's half")
    with open(tmp) as writing:
        fcntl.flock(writing.fileno(), fcntl.LOCK_EX)
        atomic_write_text(tmp_path / "z.csv", "z\n")
        assert tmp.exists()
    atomic_write_text(tmp_path / "z.csv", "z\n")  # its writer gone: taken for stale
    assert not tmp.exists()


def test_a_name_too_long_and_a_directory_at_the_lock_are_one_clear_error(tmp_path):
    from otfuse.errors import OtfuseError
    from otfuse.storage import atomic_write_text, output_lock

    with pytest.raises(OtfuseError, match="more than the 255 a file system allows"):
        atomic_write_text(tmp_path / ("n" * 300 + ".csv"), "a\n")
    near = tmp_path / ("m" * 250 + ".csv")  # a legal name whose temporary and lock names would be too long: shortened
    with output_lock(near):
        atomic_write_text(near, "a\n")
    assert near.read_text() == "a\n" and [p.name for p in tmp_path.iterdir()] == [near.name]
    (tmp_path / ".d.pt.lock").mkdir()
    with pytest.raises(OtfuseError, match="is a directory; remove it"):
        with output_lock(tmp_path / "d.pt"):
            pass


def test_a_lock_name_that_points_at_a_users_file_is_refused_and_the_file_kept(tmp_path):
    """DAMAGE: a symbolic or hard link planted at `.<name>.lock` used to be truncated and given a pid, and the
    user's file behind it with it; now anything there that otfuse did not make is refused, the file untouched."""
    from otfuse.errors import OtfuseError
    from otfuse.storage import output_lock

    victim = tmp_path / "victim" / "notes.txt"
    victim.parent.mkdir()
    victim.write_text("my notes\n")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".fused.pt.lock"
    for plant, why in ((lambda: lock.symlink_to(victim), "symbolic link"), (lambda: os.link(victim, lock), "not a lock otfuse made")):
        plant()
        with pytest.raises(OtfuseError, match=why):
            with output_lock(out / "fused.pt"):
                pass
        assert victim.read_text() == "my notes\n"
        lock.unlink()
    lock.write_text("a file of the user's that happens to bear this name")
    with pytest.raises(OtfuseError, match="not a lock otfuse made"):
        with output_lock(out / "fused.pt"):
            pass
    assert lock.read_text().startswith("a file of the user's")
    os.mkfifo(out / ".x.csv.lock")
    with pytest.raises(OtfuseError, match="not a lock otfuse made"):
        with output_lock(out / "x.csv"):
            pass


def test_only_otfuses_own_temporary_files_are_ever_removed(tmp_path):
    """DAMAGE: files that merely looked like a temporary (.<name>.<digits>-<x>.tmp) were deleted by any write to
    their folder; otfuse's own carry a prefix no one else uses."""
    theirs = [tmp_path / ".chapter3.md.2024-final.tmp", tmp_path / ".data.tar.1234-part.tmp"]
    for p in theirs:
        p.write_text("someone's work")
    os.symlink(tmp_path / "elsewhere", tmp_path / ".otfuse-tmp.l.pt.1-x.tmp")
    atomic_write_text(tmp_path / "z.txt", "x")
    assert all(p.read_text() == "someone's work" for p in theirs)
    assert (tmp_path / ".otfuse-tmp.l.pt.1-x.tmp").is_symlink()
