"""The `otfuse` command: train, finetune, evaluate, fuse, tune, interpolate.

    otfuse train --dataset fashion-mnist --width 16 --epochs 4 --seed 0
    otfuse evaluate checkpoint/fashion-mnist/resnet18-w16/seed0.pt
    otfuse fuse A.pt B.pt --method activation --out fused.pt

A bad input prints one line, `otfuse: error: ...`, and exits with code 2, having written nothing.
The fusion commands import their libraries (Torch-Pruning, timm, POT, optuna, matplotlib) when they run, so
that `otfuse train` and `otfuse evaluate` start in the time PyTorch takes: run_train_all.sh starts one per model.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from otfuse.checkpoints import data_of, fused_from, fused_meta, load_checkpoint, pick_device, save_checkpoint
from otfuse.data import dataset_slug, default_data_dir
from otfuse.errors import OtfuseError, run_main
from otfuse.evaluate import logits, loss_and_accuracy
from otfuse.models import arch_folder, model_from_meta, shapes_beyond
from otfuse.options import Parser, add_options, flatten, read_config, resolve
from otfuse.precision import resolve_precision
from otfuse.storage import atomic_write_csv, check_outputs, inputs_name, output_lock, writable_dir
from otfuse.subsets import parts_of, restrict
from otfuse.train import FINETUNE, FINETUNE_FITTED, TrainConfig, checkpoint_path, finetune_config, finetune_defaults, train

if TYPE_CHECKING:
    from otfuse.inputs import FusionInputs


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve(TrainConfig, vars(args))
    before = _stamp(checkpoint_path(cfg))
    path = train(cfg)
    print(f"saved {path}" if _stamp(path) != before else f"{path} is already complete ({cfg.epochs} epochs): nothing to do")
    return 0


def _stamp(path: Path) -> tuple | None:
    return (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train a (fused) checkpoint further with the training loop; its dataset, arch, width, split and seed come from it."""
    _, meta, _ = load_checkpoint(args.checkpoint)
    given = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    for k in ("dataset", "arch", "width"):
        if k in given and given[k] != meta[k]:
            raise OtfuseError(f"--{k} {given[k]!r} differs from {args.checkpoint}'s {meta[k]!r}; drop the option")
    epochs = given.get("epochs", finetune_defaults(meta)["epochs"])
    out = given.pop("out", "") or str(Path(args.checkpoint).with_name(f"{Path(args.checkpoint).stem}-ft{epochs}.pt"))
    cfg = finetune_config(meta, args.checkpoint, out, **given)
    path = train(cfg)
    print(f"saved {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model, meta, _ = load_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    data = restrict(data_of(meta, args.data_dir), parts_of(meta))  # validation: only the images its parties held
    x, y = data.split(args.split)
    loss, acc = loss_and_accuracy(model.to(device), x.to(device), y, data.norm, resolve_precision(args.precision, device))
    if not math.isfinite(loss):
        raise OtfuseError(
            f"checkpoint {args.checkpoint} computes NaN or infinite outputs on {meta['dataset']}'s {args.split} split "
            "(e.g. BatchNorm variances of zero): its weights are damaged; re-create it"
        )
    print(f"{args.checkpoint}: {meta['dataset']} {args.split} accuracy {acc:.2f}% (loss {loss:.4f}, {len(y)} images)")
    return 0


def _inputs(checkpoints: list[str], config: str = "") -> dict[str, str]:
    """An input's role by name, for the output checks: each checkpoint and the --config file."""
    return {**{f"input checkpoint {i + 1} ({c})": c for i, c in enumerate(checkpoints)}, "--config": config}


def cmd_fuse(args: argparse.Namespace) -> int:
    from otfuse.budget import check_budget
    from otfuse.inputs import check_request, fusion_inputs

    check_request(len(args.checkpoints), args.width, vars(args), args.config)
    if args.merge_until and len(args.checkpoints) < 2:
        raise OtfuseError("--merge-until keeps each parent's later layers as a branch: give two or more checkpoints")
    check_budget(args.budget, len(args.checkpoints), args.width, args.merge_until)
    check_outputs({"--out": args.out}, _inputs(args.checkpoints, args.config), args.overwrite, lambda p: fused_from(p, args.checkpoints))
    with output_lock(args.out):
        return _fuse(args, fusion_inputs(args.checkpoints, vars(args), args.config, args.width, args.data_dir, args.device))


def _fuse(args: argparse.Namespace, inputs: FusionInputs) -> int:
    from otfuse.fusion import fuse, timed
    from otfuse.partial import chosen_cuts, partial_rows
    from otfuse.report import accuracies, table

    cfg, metas, data = inputs.cfg, inputs.metas, inputs.data
    if args.budget:
        fusion = within_budget(inputs, args.budget)
    else:
        fusion = fuse(inputs.models, data.train_x, data.norm, cfg, target=inputs.target, progress=True, class_counts=inputs.class_counts)
    made = sum(fusion.seconds.values())
    options = {**flatten(cfg), **({"budget": args.budget} if args.budget else {})}
    meta = lambda acc: {
        **fused_meta(metas, args.checkpoints, inputs.width, options, acc if args.split == "test" else None),
        **({"shapes": shapes_beyond(fusion.fused, inputs.target)} if args.budget else {}),
    }
    if args.out:  # the fused model first: the evaluation below is extra, never a reason to lose it
        save_checkpoint(args.out, fusion.fused, meta(None))
        print(f"saved {args.out} (fused in {made:.1f} s, {fusion.precision})", flush=True)
    if args.baselines:
        acc = table(fusion, data, args.split, progress=True, tasks=inputs.tasks)
    else:
        with timed(fusion.seconds, "evaluation", True):
            x, y = data.split(args.split)
            acc = accuracies("fused", logits(fusion.fused, x, data.norm, precision=fusion.precision), y, inputs.tasks)
    widths = "+".join(f"w{m['width']}" for m in metas)
    print(f"{metas[0]['dataset']} {metas[0]['arch']} {widths} -> w{inputs.width}, {args.split} accuracy (%), method {cfg.align.method}:")
    if inputs.tasks:
        print("  (parents trained on parts of the data: every class, then each parent's task: its classes' images, argmax within them)")
    for k, v in acc.items():
        print(f"  {k:<20} {v:6.2f}")
    if args.budget:
        from otfuse.budget import macs_ratio

        ratio = macs_ratio(fusion.fused, inputs.models[0], data.train_x, data.norm)
        print(f"  {'FLOPs':<20} {ratio:6.3f} times one parent's (--budget {args.budget:g})")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in fusion.seconds.items()))
    if args.merge_until:
        print(f"partial merges (the layers up to the cut fused, each parent's later layers a branch; {args.split} accuracy, %):")
        partial_rows(
            fusion,
            chosen_cuts(fusion.fused, args.merge_until),
            data.train_x,
            *data.split(args.split),
            data.norm,
            inputs.tasks,
            progress=True,
        )
    if args.out and args.split == "test":  # the metadata gains the accuracy just measured
        save_checkpoint(args.out, fusion.fused, meta(acc["fused"]))
    return 0


def within_budget(inputs: FusionInputs, budget: float):
    """`otfuse.budget.fuse_within_budget` of the parents, their architecture at K times their width the side-by-side model."""
    from otfuse.budget import fuse_within_budget

    if not inputs.width:
        raise OtfuseError(f"--budget widens the architecture, and {inputs.metas[0]['arch']} has no width knob; use a registry architecture")
    wide = model_from_meta(inputs.metas[0], len(inputs.models) * inputs.width).to(inputs.data.train_x.device)
    return fuse_within_budget(
        inputs.models, wide, budget, inputs.data.train_x, inputs.data.norm, inputs.cfg, progress=True, class_counts=inputs.class_counts
    )


def cmd_tune(args: argparse.Namespace) -> int:
    from otfuse.inputs import check_request, fusion_inputs
    from otfuse.tune import TuneConfig, run_study

    tcfg = resolve(TuneConfig, vars(args))
    tcfg.check()
    if len(args.checkpoints) != 2:
        raise OtfuseError(f"tune needs exactly two checkpoints, got {len(args.checkpoints)}; give A.pt B.pt")
    check_request(2, args.width, vars(args), args.config)
    writable_dir(tcfg.results_dir)
    inputs = fusion_inputs(args.checkpoints, vars(args), args.config, args.width, args.data_dir, args.device)
    # what the user pinned (on the command line or in --config) is not searched
    fixed = frozenset(k for k in flatten(inputs.cfg) if k in vars(args)) | frozenset(read_config(args.config) if args.config else ())
    out = run_study(
        inputs.models,
        inputs.data,
        inputs.metas,
        args.checkpoints,
        tcfg,
        inputs.cfg,
        progress=True,
        target=inputs.target,
        width=inputs.width,
        fixed=fixed,
    )
    print(
        f"study {out['study']}: {out['trials']} completed trials; best #{out['best_trial']} "
        f"validation {out['val_accuracy']:.2f}% (again: {out['val_accuracy_again']:.2f}%)"
    )
    print("best options: " + ", ".join(f"{k}={v}" for k, v in out["options"].items()))
    print(f"test accuracy of the best options (read once, now): {out['test_accuracy']:.2f}%")
    print("wrote " + ", ".join(out["files"]))
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from otfuse.inputs import check_request, fusion_inputs
    from otfuse.interpolate import interpolation, options_note
    from otfuse.plots import interpolation_figure, save_figure

    given = {**vars(args), "weights": ""}  # the curves' weights are (1 - alpha, alpha), set along the line
    if not 2 <= args.points <= 1001:
        raise OtfuseError(f"--points {args.points}: give 2 (the two parents) to 1001")
    if len(args.checkpoints) != 2:
        raise OtfuseError(f"interpolate needs exactly two checkpoints, got {len(args.checkpoints)}; give A.pt B.pt")
    check_request(2, 0, given, args.config)
    results = writable_dir(args.results_dir)
    inputs = fusion_inputs(args.checkpoints, given, args.config, 0, args.data_dir, args.device, same_width=True)
    models, metas, data, cfg = inputs.models, inputs.metas, inputs.data, inputs.cfg
    meta0, names = metas[0], " and ".join(Path(c).name for c in args.checkpoints)
    # named by the inputs' identities: the same inputs replace their own earlier result, other inputs never do
    stem = results / f"interp-{dataset_slug(meta0['dataset'])}-{arch_folder(meta0['arch'], meta0['width'])}-{inputs_name(args.checkpoints)}"
    check_outputs({"the CSV": f"{stem}.csv", "the plot": f"{stem}.png"}, _inputs(args.checkpoints, args.config), own=lambda _: True)
    with output_lock(f"{stem}.csv", f"{stem}.png"):
        rows = interpolation(models, data, cfg, args.points, args.split, progress=True)
        atomic_write_csv(f"{stem}.csv", rows)
        title = f"{dataset_slug(meta0['dataset'])}, {meta0['arch']} width {meta0['width']}: interpolating {names}\n{options_note(cfg)}"
        save_figure(interpolation_figure(rows, title, args.split), f"{stem}.png")
    for r in rows:
        print(f"  alpha {r['alpha']:.2f} {r['curve']:<15} accuracy {r['accuracy']:6.2f}  loss {r['loss']:.4f}")
    print(f"wrote {stem}.csv, {stem}.png")
    return 0


def _fusion_options(p: argparse.ArgumentParser, exclude=lambda _: False) -> None:
    """The fusion options (FuseConfig) but those `exclude` names, --config, --device and --data-dir."""
    from otfuse.align import METHODS
    from otfuse.fusion import FuseConfig

    add_options(p, FuseConfig, only_given=True, helps={"method": " | ".join(METHODS)}, exclude=exclude)
    p.add_argument("--config", default="", help="JSON of fusion options (e.g. otfuse tune's best); options given here override it")
    p.add_argument("--device", default="auto", help="auto: cuda when available")
    p.add_argument("--data-dir", default=None, help=f"dataset cache (default: {default_data_dir()})")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The otfuse parser; given the subcommand about to run, only its options are built (the fusion options import
    the fusion libraries)."""
    parser = Parser(prog="otfuse", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true", help="also show other libraries' warnings (PyTorch, POT, optuna)")
    sub.add_parser = functools.partial(sub.add_parser, parents=[verbose])  # every subcommand takes --verbose
    p = sub.add_parser("train", help="train one seeded model (resumable)")
    add_options(p, TrainConfig, exclude=lambda name: name == "parts")  # set from a checkpoint, never typed
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("finetune", help="fine-tune a (fused) checkpoint with the training loop: otfuse finetune F.pt --epochs 1")
    p.add_argument("checkpoint")
    add_options(p, TrainConfig, FINETUNE, only_given=True, exclude=lambda name: name in ("init", "parts"))  # the checkpoint is the start
    p.epilog = (
        "Defaults shown are those of most checkpoints; a fusion of parents that fit their training set (99% training "
        f"accuracy, augmented) defaults to {' '.join(f'{k}={v}' for k, v in FINETUNE_FITTED.items())}, its parents teaching."
    )
    p.set_defaults(run=cmd_finetune)
    p = sub.add_parser("evaluate", help="print a checkpoint's accuracy")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the images to score (default: test)")
    p.add_argument("--device", default="auto", help="auto: cuda when available")
    p.add_argument("--data-dir", default=None, help=f"dataset cache (default: {default_data_dir()})")
    p.add_argument("--precision", default="auto", help="auto (bf16 autocast where the device has native bf16) | fp32 | bf16")
    p.set_defaults(run=cmd_evaluate)
    fusion = {
        "fuse": sub.add_parser("fuse", help="fuse two or more checkpoints (widths may differ) and print the accuracy table"),
        "tune": sub.add_parser("tune", help="optuna study over the fusion options on the validation split (resumable, shareable)"),
        "interpolate": sub.add_parser("interpolate", help="accuracy and loss between two models, vanilla and aligned: CSV and PNG"),
        "federate": sub.add_parser("federate", help="K parties federated on Flower's simulation engine: OT fusion, FedAvg, FedProx"),
    }
    for name, p in fusion.items():
        if command in (None, name):
            FUSION_OPTIONS[name](p)
    return parser


def _fuse_options(p: argparse.ArgumentParser) -> None:
    from otfuse.partial import MERGE_UNTIL_HELP

    p.add_argument("checkpoints", nargs="*")
    p.add_argument(
        "--width",
        type=int,
        default=0,
        help="width of the fused model (default 0: the first parent's); with one checkpoint, compresses or widens it",
    )
    p.add_argument(
        "--out",
        default="",
        help="where to save the fused checkpoint (an existing file only if it is an "
        "earlier fusion of these checkpoints, or with --overwrite)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file whatever it holds")
    p.add_argument("--split", default="test", choices=["val", "test"], help="the images to score (default: test; choose options on val)")
    p.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also evaluate every stage and baseline: parents, ensemble, vanilla averaging, REPAIR (default: off, "
        "only the fused model, after it is saved)",
    )
    p.add_argument("--merge-until", default="", help=MERGE_UNTIL_HELP)
    p.add_argument(
        "--budget",
        type=float,
        default=0.0,
        help="at most this many times one parent's FLOPs (1 to the number of parents squared): the least alike channels "
        "of each group kept one per parent, the rest merged, refit to the parents side by side, then distilled from the "
        "parents as --distill-epochs says, to the target --head weighs (default 0: the full merge)",
    )
    _fusion_options(p)
    p.set_defaults(run=cmd_fuse)


def _tune_options(p: argparse.ArgumentParser) -> None:
    from otfuse.tune import TuneConfig

    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--width", type=int, default=0, help="width of the fused model (default 0: the first parent's)")
    add_options(p, TuneConfig, only_given=True)
    _fusion_options(p)
    p.set_defaults(run=cmd_tune)


def _interpolate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--points", type=int, default=11, help="alphas from 0 to 1 (default: 11)")
    p.add_argument("--split", default="test", choices=["val", "test"], help="the images to score (default: test; choose options on val)")
    p.add_argument("--results-dir", default="results", help="where the CSV and PNG go (default: results)")
    # the curves are the plain and the REPAIRed aligned average, with weights (1 - alpha, alpha): those options are set here
    _fusion_options(p, exclude=lambda name: name in ("weights", "refit", "repair") or name.startswith("refit_"))
    p.set_defaults(run=cmd_interpolate)


def _federate_options(p: argparse.ArgumentParser) -> None:
    try:
        from otfuse.federated import Settings
    except ImportError as e:  # Flower is an optional extra: the command says how to install it, whatever it was given
        missing = str(e)
        p.set_defaults(run=lambda _args: _missing(missing), takes_anything=True)
        return
    p.add_argument("--clients", type=int, default=3, help="SuperNodes, one party each (default: 3)")
    add_options(p, Settings)
    p.set_defaults(run=cmd_federate)


def _missing(message: str) -> int:
    raise OtfuseError(message)


def cmd_federate(args: argparse.Namespace) -> int:
    """Run the federation on Flower's simulation engine in this process: one SuperNode per client."""
    from otfuse.federated import Settings, simulate

    settings = resolve(Settings, vars(args))
    rows = simulate(settings, args.clients)
    for r in rows:
        clients = f"{r['worst_client_acc']}-{r['best_client_acc']}" if r["round"] else "-"
        print(f"  round {r['round']:>3} {r['strategy']:<9} test accuracy {r['test_acc']:6.2f}  clients' own {clients}")
    return 0


FUSION_OPTIONS = {"fuse": _fuse_options, "tune": _tune_options, "interpolate": _interpolate_options, "federate": _federate_options}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), ""))
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_anything", False):  # argparse's own check, but for a command that is missing
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_main(lambda: args.run(args), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
