"""The command line: every option of every subcommand is documented and is a field of the config the command
builds (or one of the command's own few arguments), so no option is offered that nothing reads."""

import argparse
from dataclasses import fields

import pytest

from otfuse.cli import build_parser, main
from otfuse.fusion import FuseConfig
from otfuse.options import options_of
from otfuse.train import TrainConfig
from otfuse.tune import TuneConfig

# per subcommand: the configs its options fill, and the arguments it reads itself
COMMANDS = {
    "train": ([TrainConfig], set()),
    "finetune": ([TrainConfig], {"checkpoint"}),
    "evaluate": ([], {"checkpoint", "split", "device", "data_dir", "precision"}),
    "fuse": (
        [FuseConfig],
        {"checkpoints", "width", "out", "overwrite", "split", "baselines", "merge_until", "budget", "config", "device", "data_dir"},
    ),
    "tune": ([FuseConfig, TuneConfig], {"checkpoints", "width", "config", "device", "data_dir"}),
    "interpolate": ([FuseConfig], {"checkpoints", "points", "split", "results_dir", "config", "device", "data_dir"}),
}
try:  # the flower extra
    from otfuse.federated import Settings

    COMMANDS["federate"] = ([Settings], {"clients"})
except ImportError:
    COMMANDS["federate"] = ([], set())


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_is_documented_and_read_by_its_command():
    subparsers = _subparsers()
    assert set(subparsers) == set(COMMANDS)
    for command, parser in subparsers.items():
        configs, own = COMMANDS[command]
        read = own | {o.name for cls in configs for o in options_of(cls)} | {"verbose"}  # every command: run_main reads it
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.dest in read, f"otfuse {command} offers --{action.dest}, which nothing reads"
            assert action.option_strings == [] or (action.help or "").strip(), f"otfuse {command} --{action.dest} has no help"


def test_options_a_command_overrides_are_not_offered():
    offered = {c: {a.dest for a in p._actions} for c, p in _subparsers().items()}
    assert not {"weights", "refit", "repair", "refit_ridge"} & offered["interpolate"]  # its curves set them
    assert "init" not in offered["finetune"]  # the checkpoint is the start
    assert "parts" not in offered["train"] | offered["finetune"]  # only a checkpoint sets it
    assert {f.name for f in fields(TrainConfig)} - {"init", "parts"} <= offered["finetune"]


@pytest.mark.parametrize("command", ["train", "fuse"])
def test_help_shows_each_options_meaning_and_default(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text wraps with the terminal
    assert exc.value.code == 0
    if command == "train":
        assert "peak learning rate (default: 0.2)" in out
    if command == "fuse":
        assert "activation | weight | weight-matching (default: activation)" in out


@pytest.mark.slow
def test_output_piped_into_head_loses_nothing(trained, tmp_path):
    """The reader of stdout goes away after one line (`otfuse fuse ... | head -1`): the command still saves its fusion,
    exits 0 and prints no traceback."""
    import os
    import subprocess
    import sys

    _, _, paths, root = trained
    out = tmp_path / "fused.pt"
    cmd = [
        sys.executable,
        "-m",
        "otfuse",
        "fuse",
        str(paths[0]),
        str(paths[1]),
        "--out",
        str(out),
        "--baselines",
        "--data-dir",
        str(root / "data"),
        "--device",
        "cpu",
        "--bn-batches",
        "4",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.readline()
    proc.stdout.close()  # as head does once it has its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and out.is_file()


def test_other_libraries_warnings_show_only_with_verbose(capsys):
    import warnings

    from otfuse.errors import run_main

    def warn() -> int:
        warnings.warn_explicit("Sinkhorn did not converge", UserWarning, "_sinkhorn.py", 666, module="ot.bregman._sinkhorn")
        return 0

    assert run_main(warn) == 0
    assert capsys.readouterr().err == ""
    assert run_main(warn, verbose=True) == 0  # one line, like an error, naming where it comes from
    assert capsys.readouterr().err == "otfuse: warning: Sinkhorn did not converge (_sinkhorn.py:666)\n"
