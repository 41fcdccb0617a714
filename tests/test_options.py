"""Options: one flat name per stage field, JSON files of them, and flags that override a --config file
however they are written (--no-x, --x=v, abbreviations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otfuse.cli import build_parser
from otfuse.errors import OtfuseError
from otfuse.fusion import FuseConfig
from otfuse.inputs import fusion_options
from otfuse.options import build, flatten, options_of, read_config


def _resolved(parser, argv: list[str], metas: list[dict]) -> FuseConfig:
    args = parser.parse_args(argv)
    return fusion_options(vars(args), args.config, metas)


def _cfg(argv: list[str]) -> FuseConfig:
    args = build_parser().parse_args(["fuse", "a.pt", "b.pt", *argv])
    return fusion_options(vars(args), args.config)


@pytest.fixture
def best(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"method": "weight", "refit": True, "refit_ridge": 0.5, "bn_batches": 7, "_val_accuracy": 1.0}))
    return str(path)


def test_each_stage_has_only_its_own_options():
    cfg = FuseConfig()
    assert not {"n_images", "ridge"} & set(vars(cfg.bn))
    assert set(vars(cfg.refit)) >= {"enabled", "ridge", "n_images"} and "method" not in vars(cfg.refit)
    names = [o.name for o in options_of(FuseConfig)]
    assert {"method", "n_images", "bn_batches", "repair", "repair_n_images", "refit", "refit_ridge", "refit_n_images"} <= set(names)
    assert len(names) == len(set(names))


def test_a_config_file_fills_what_the_command_line_leaves_out(best):
    cfg = _cfg(["--config", best])
    assert (cfg.align.method, cfg.refit.enabled, cfg.refit.ridge, cfg.bn.batches) == ("weight", True, 0.5, 7)
    assert cfg.align.n_images == FuseConfig().align.n_images


@pytest.mark.parametrize(
    "argv,check",
    [
        (["--no-refit"], lambda c: c.refit.enabled is False),
        (["--meth", "activation"], lambda c: c.align.method == "activation"),
        (["--refit-ridge=0.01"], lambda c: c.refit.ridge == 0.01),
        (["--bn-batches", "3", "--method=weight-matching"], lambda c: c.bn.batches == 3 and c.align.method == "weight-matching"),
    ],
)
def test_flags_override_the_config_file_however_they_are_written(best, argv, check):
    assert check(_cfg(["--config", best, *argv])) and check(_cfg([*argv, "--config", best]))


def test_a_flag_left_out_keeps_the_files_value_not_the_default(best):
    cfg = _cfg(["--config", best, "--no-repair"])
    assert cfg.refit.enabled is True and cfg.refit.ridge == 0.5 and cfg.repair.enabled is False


def test_flatten_and_build_round_trip():
    cfg = build(FuseConfig, {"method": "weight", "bn_augment": True, "refit": False, "weights": "1,2"})
    assert build(FuseConfig, flatten(cfg)) == cfg


@pytest.mark.parametrize(
    "obj,message",
    [
        ({"bn_batches": "ten"}, "bn_batches must be an integer"),
        ({"refit": "yes"}, "refit must be true or false"),
        ({"reg": None}, "reg must be a finite number"),
        ({"colour": "blue"}, "unknown option(s) colour"),
    ],
)
def test_bad_config_values_are_one_clear_error(tmp_path, obj, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(OtfuseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(FuseConfig, read_config(path), f"--config {path}")


def _meta(train_acc: float, augment: bool = True, dataset: str = "cifar10") -> dict:
    return {"train_acc": train_acc, "dataset": dataset, "config": {"augment": augment, "epochs": 50}}


def test_the_parents_training_recipe_sets_defaults_that_options_still_override(best):
    parser = build_parser()
    fit = [_meta(99.8), _meta(99.7)]
    assert _resolved(parser, ["fuse", "a.pt", "b.pt"], fit).bn.augment  # long-trained: augmented statistics
    assert not _resolved(parser, ["fuse", "a.pt", "b.pt"], [_meta(99.8), _meta(91.5)]).bn.augment
    assert not _resolved(parser, ["fuse", "a.pt", "b.pt"], [_meta(99.8, False)] * 2).bn.augment
    # digits has no augmentation, whatever the recipe said: its statistics are never drawn from crops and flips
    assert not _resolved(parser, ["fuse", "a.pt", "b.pt"], [_meta(99.9, True, "digits")] * 2).bn.augment
    assert not _resolved(parser, ["fuse", "a.pt", "b.pt", "--no-bn-augment"], fit).bn.augment
    Path(best).write_text(json.dumps({"bn_augment": False}))
    assert not _resolved(parser, ["fuse", "a.pt", "b.pt", "--config", best], fit).bn.augment
