"""otfuse tune: the test set is read once at the end, the best options reproduce through `fuse --config`,
and workers sharing one SQLite study all add trials, a killed study resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest

from otfuse.cli import main
from otfuse.data import ImageData

FAST = ["--methods", "weight,activation", "--device", "cpu"]


def _completed(url: str, study: str) -> list:
    s = optuna.load_study(study_name=study, storage=url)
    return [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_tune_reads_the_test_set_only_for_the_final_report(trained, tmp_path, monkeypatch, capsys):
    _, _, paths, root = trained
    reads: list[str] = []
    original = ImageData.__getattribute__

    def counting(self, name):
        if name in ("val_x", "test_x"):
            reads.append(name[:-2])
        return original(self, name)

    monkeypatch.setattr(ImageData, "__getattribute__", counting)
    results = tmp_path / "not-yet-there"
    code = main(
        ["tune", str(paths[0]), str(paths[1]), "--n-trials", "2", "--results-dir", str(results), "--data-dir", str(root / "data"), *FAST]
    )
    monkeypatch.setattr(ImageData, "__getattribute__", original)
    out = capsys.readouterr().out
    assert code == 0, out
    assert reads.count("val") >= 2
    assert reads.count("test") == 1 and reads[-1] == "test", reads
    best = next(results.glob("tune-*-best.json"))
    assert (results / best.name.replace("-best.json", ".csv")).is_file()
    assert (results / best.name.replace("-best.json", "-history.png")).stat().st_size > 10_000

    # the best options, applied by `otfuse fuse --config`, give the best trial's validation accuracy
    val = json.loads(best.read_text())["_val_accuracy"]
    code = main(
        ["fuse", str(paths[0]), str(paths[1]), "--config", str(best), "--split", "val", "--data-dir", str(root / "data"), "--device", "cpu"]
    )
    out = capsys.readouterr().out
    fused = float(re.search(r"^\s+fused\s+([\d.]+)$", out, flags=re.M).group(1))
    assert code == 0 and abs(fused - val) < 0.01, (fused, val)


def test_config_errors_are_one_line(trained, tmp_path, capsys):
    _, _, paths, root = trained
    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "activation", "colour": "blue"}')
    code = main(["fuse", str(paths[0]), str(paths[1]), "--config", str(bad), "--data-dir", str(root / "data")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown option(s) colour" in err and "\n" not in err
    code = main(["tune", str(paths[0]), "--data-dir", str(root / "data"), "--results-dir", str(tmp_path)])
    assert code == 2 and "exactly two checkpoints" in capsys.readouterr().err


def _worker(paths, root, url, n, results):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(_command(paths, root, url, n, results), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _command(paths, root, url, n, results) -> list[str]:
    return [
        sys.executable,
        "-m",
        "otfuse",
        "tune",
        str(paths[0]),
        str(paths[1]),
        "--storage",
        url,
        "--study",
        "shared",
        "--n-trials",
        str(n),
        "--results-dir",
        str(results),
        "--data-dir",
        str(root / "data"),
        *FAST,
        "--no-refit",
        "--bn-batches",
        "4",
        "--n-images",
        "250",
    ]  # pinned (not searched): cheap trials


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_and_a_killed_study_resumes(trained, tmp_path, capsys):
    """Two worker processes on one SQLite study: the one asked for 2 trials adds exactly 2, the other adds its own
    (never the same options twice) until it is killed mid-study; the same command then resumes the study."""
    _, _, paths, root = trained
    url = f"sqlite:///{tmp_path / 'study.db'}"
    finite, killed = _worker(paths, root, url, 2, tmp_path), _worker(paths, root, url, 1000, tmp_path)
    out = finite.communicate(timeout=600)[0]
    assert finite.returncode == 0, out
    deadline = time.time() + 300
    while len({t.user_attrs["worker"] for t in _completed(url, "shared")}) < 2 and time.time() < deadline:
        time.sleep(0.5)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = _completed(url, "shared")
    by_worker = Counter(t.user_attrs["worker"] for t in done)
    assert len(by_worker) == 2 and min(by_worker.values()) >= 1, by_worker  # both added theirs
    assert by_worker[next(w for w in by_worker if w.endswith(f":{finite.pid}"))] == 2  # and none lost
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == len(done)  # never the same options twice

    again = _command(paths, root, url, 1, tmp_path)[3:]  # in this process: the same command, without a start-up
    assert main(again) == 0
    assert len(_completed(url, "shared")) == len(done) + 1
    assert "test accuracy of the best options" in capsys.readouterr().out


def test_options_given_on_the_command_line_are_fixed_in_every_trial(trained, tmp_path, capsys):
    _, _, paths, root = trained
    url = f"sqlite:///{tmp_path / 'pinned.db'}"
    code = main(
        [
            "tune",
            str(paths[0]),
            str(paths[1]),
            "--bn-batches",
            "4",
            "--no-refit",
            "--n-trials",
            "2",
            "--storage",
            url,
            "--study",
            "pinned",
            "--results-dir",
            str(tmp_path),
            "--data-dir",
            str(root / "data"),
            *FAST,
        ]
    )
    assert code == 0, capsys.readouterr().err
    done = _completed(url, "pinned")
    assert len(done) == 2 and all(t.user_attrs["options"]["bn_batches"] == 4 and not t.user_attrs["options"]["refit"] for t in done)
    assert all("bn_batches" not in t.params and "refit" not in t.params for t in done)  # not searched at all


def test_ctrl_c_during_a_trial_is_one_line(trained, tmp_path, monkeypatch, capsys):
    import otfuse.tune as T

    _, _, paths, root = trained

    def interrupted(*_args, **_kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "val_accuracy", interrupted)
    code = main(
        ["tune", str(paths[0]), str(paths[1]), "--n-trials", "1", "--results-dir", str(tmp_path), "--data-dir", str(root / "data"), *FAST]
    )
    err = capsys.readouterr().err.strip()
    assert code == 130 and err == "otfuse: interrupted"
