"""The `otfuse` command: train, evaluate, fuse.

    otfuse train --dataset fashion-mnist --width 16 --epochs 4 --seed 0
    otfuse evaluate checkpoint/fashion-mnist/resnet18-w16/seed0.pt
    otfuse fuse A.pt B.pt --method activation --out fused.pt

A bad input prints one line, `otfuse: error: ...`, and exits with code 2.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from otfuse.errors import OtfuseError


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the dataclass source (and its bases): the option's help."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        out.update({k: v.replace("%", "%%") for k, v in re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", src, flags=re.M)})
    return out


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, defaults: dict | None = None) -> None:
    """One --option per dataclass field, so every hyperparameter is defined in one place."""
    comments = _field_comments(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=comments.get(f.name))
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            note = comments.get(f.name)
            parser.add_argument(flag, type=kind, default=default, help=f"{note} (default: {default})" if note else f"default: {default}")


def _dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def cmd_train(args: argparse.Namespace) -> int:
    from otfuse.train import TrainConfig, train

    path = train(_dataclass_from_args(TrainConfig, args))
    print(f"saved {path}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """Train a (fused) checkpoint further with the training loop; its dataset, arch and width come from it."""
    from otfuse.models import load_checkpoint
    from otfuse.train import TrainConfig, train

    _, meta, _ = load_checkpoint(args.checkpoint)
    cfg = _dataclass_from_args(TrainConfig, args)
    for k in ("dataset", "arch", "width"):
        if k in args._given and getattr(cfg, k) != meta[k]:
            raise OtfuseError(f"--{k} {getattr(cfg, k)!r} differs from {args.checkpoint}'s {meta[k]!r}; drop the option")
        setattr(cfg, k, meta[k])
    cfg.init = args.checkpoint
    cfg.out = cfg.out or str(Path(args.checkpoint).with_name(f"{Path(args.checkpoint).stem}-ft{cfg.epochs}.pt"))
    path = train(cfg)
    print(f"saved {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from otfuse.data import load_dataset
    from otfuse.evaluate import loss_and_accuracy
    from otfuse.models import load_checkpoint

    model, meta, _ = load_checkpoint(args.checkpoint)
    data = load_dataset(meta["dataset"], args.data_dir)
    x, y = data.split(args.split)
    loss, acc = loss_and_accuracy(model, x, y, (meta["mean"], meta["std"]))
    print(f"{args.checkpoint}: {meta['dataset']} {args.split} accuracy {acc:.2f}% (loss {loss:.4f}, {len(y)} images)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from otfuse.data import default_data_dir
    from otfuse.train import FINETUNE, TrainConfig

    parser = argparse.ArgumentParser(prog="otfuse", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one seeded model (resumable)")
    _add_dataclass_args(p, TrainConfig)
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("finetune", help="fine-tune a (fused) checkpoint with the training loop: otfuse finetune F.pt --epochs 1")
    p.add_argument("checkpoint")
    _add_dataclass_args(p, TrainConfig, FINETUNE)
    p.set_defaults(run=cmd_finetune)
    p = sub.add_parser("evaluate", help="print a checkpoint's accuracy")
    p.add_argument("checkpoint")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data-dir", default=str(default_data_dir()))
    p.set_defaults(run=cmd_evaluate)
    _add_fusion_commands(sub)
    return parser


def add_fuse_options(p: argparse.ArgumentParser, default_method: str = "activation") -> None:
    """The fusion options (FuseConfig), --device and --data-dir, shared by `otfuse fuse` and the scripts."""
    from otfuse.data import default_data_dir
    from otfuse.fuse import FuseConfig

    _add_dataclass_args(p, FuseConfig)
    p.set_defaults(method=default_method)
    p.add_argument("--config", default="", help="JSON of fusion options (e.g. otfuse tune's best); flags given here override it")
    p.add_argument("--device", default="auto", help="auto: cuda when available")
    p.add_argument("--data-dir", default=str(default_data_dir()))


def fuse_config_from_args(args: argparse.Namespace):
    from otfuse.fuse import FuseConfig
    from otfuse.tune import read_config

    cfg = _dataclass_from_args(FuseConfig, args)
    if args.config:
        given = getattr(args, "_given", set())
        cfg = FuseConfig(**{**cfg.__dict__, **{k: v for k, v in read_config(args.config).items() if k not in given}})
    cfg.check()
    return cfg


def load_parents(paths: list[str], data_dir: str, device_name: str):
    """(models on the device, their metadata, the first one's dataset on the device), after checking
    the checkpoints can be fused: same architecture, width, class count and dataset."""
    from otfuse.data import load_dataset
    from otfuse.models import load_checkpoint
    from otfuse.train import pick_device

    loaded = [load_checkpoint(p) for p in paths]
    meta0 = loaded[0][1]
    for path, (_, meta, _) in zip(paths[1:], loaded[1:]):
        for k in ("arch", "width", "in_channels", "num_classes", "dataset"):
            if meta.get(k) != meta0.get(k):
                raise OtfuseError(f"{path} has {k}={meta.get(k)!r} but {paths[0]} has {meta0.get(k)!r}; fuse models of one architecture, width, class count and dataset")
    device = pick_device(device_name)
    data = load_dataset(meta0["dataset"], data_dir).to(device)
    return [m.to(device) for m, _, _ in loaded], [meta for _, meta, _ in loaded], data


def cmd_fuse(args: argparse.Namespace) -> int:
    from otfuse.fuse import fusion_report
    from otfuse.models import save_checkpoint
    from otfuse.storage import writable_dir

    cfg = fuse_config_from_args(args)
    if len(args.checkpoints) < 2:
        raise OtfuseError(f"fuse needs two or more checkpoints, got {len(args.checkpoints)}; give A.pt B.pt [more.pt]")
    if args.out:
        writable_dir(Path(args.out).parent)
    models, metas, data = load_parents(args.checkpoints, args.data_dir, args.device)
    meta0 = metas[0]
    fused, acc, timings = fusion_report(models, data, cfg, progress=True, split=args.split)
    print(f"{meta0['dataset']} {meta0['arch']} w{meta0['width']}, {args.split} accuracy (%), method {cfg.method}:")
    for k, v in acc.items():
        print(f"  {k:<14} {v:6.2f}")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if args.out:
        meta = {k: v for k, v in meta0.items() if k not in ("history", "config")}
        meta.update(kind="fused", method=cfg.method, options=dict(cfg.__dict__), parents=list(args.checkpoints),
                    test_acc=acc["fused"] if args.split == "test" else None)
        save_checkpoint(args.out, fused, meta)
        print(f"saved {args.out}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from otfuse.tune import TuneConfig, run_study

    base = fuse_config_from_args(args)
    tcfg = _dataclass_from_args(TuneConfig, args)
    tcfg.method_list()
    if len(args.checkpoints) != 2:
        raise OtfuseError(f"tune needs exactly two checkpoints, got {len(args.checkpoints)}; give A.pt B.pt")
    models, metas, data = load_parents(args.checkpoints, args.data_dir, args.device)
    out = run_study(models, data, metas[0], [m.get("seed", "?") for m in metas], tcfg, base, progress=True)
    print(f"study {out['study']}: {out['trials']} completed trials; best #{out['best_trial']} "
          f"validation {out['val_accuracy']:.2f}% (again: {out['val_accuracy_again']:.2f}%)")
    print("best options: " + ", ".join(f"{k}={v}" for k, v in out["options"].items()))
    print(f"test accuracy of the best options (read once, now): {out['test_accuracy']:.2f}%")
    print("wrote " + ", ".join(out["files"]))
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from otfuse.data import dataset_slug
    from otfuse.interpolate import interpolation, interpolation_figure, options_note
    from otfuse.results import save_figure
    from otfuse.storage import atomic_write_csv, writable_dir

    cfg = fuse_config_from_args(args)
    if args.points < 2:
        raise OtfuseError(f"--points {args.points}: give at least 2 (the two parents)")
    if len(args.checkpoints) != 2:
        raise OtfuseError(f"interpolate needs exactly two checkpoints, got {len(args.checkpoints)}; give A.pt B.pt")
    results = writable_dir(args.results_dir)
    models, metas, data = load_parents(args.checkpoints, args.data_dir, args.device)
    meta0, seeds = metas[0], "-".join(str(m.get("seed", "?")) for m in metas)
    rows = interpolation(models, data, cfg, args.points, args.split, progress=True)
    stem = results / f"interp-{dataset_slug(meta0['dataset'])}-{meta0['arch']}-w{meta0['width']}-seeds{seeds}"
    atomic_write_csv(f"{stem}.csv", rows)
    title = (f"{dataset_slug(meta0['dataset'])}, {meta0['arch']} width {meta0['width']}, seeds {seeds}: "
             f"interpolating A (seed {metas[0].get('seed')}) to B\n{options_note(cfg)}")
    save_figure(interpolation_figure(rows, title, args.split), f"{stem}.png")
    for r in rows:
        print(f"  alpha {r['alpha']:.2f} {r['curve']:<15} accuracy {r['accuracy']:6.2f}  loss {r['loss']:.4f}")
    print(f"wrote {stem}.csv, {stem}.png")
    return 0


def _add_fusion_commands(sub) -> None:
    from otfuse.tune import TuneConfig

    p = sub.add_parser("fuse", help="fuse two or more checkpoints and print the accuracy table")
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--out", default="", help="where to save the fused checkpoint")
    p.add_argument("--split", default="test", choices=["val", "test"])
    add_fuse_options(p)
    p.set_defaults(run=cmd_fuse)
    p = sub.add_parser("tune", help="optuna study over the fusion options on the validation split (resumable, shareable)")
    p.add_argument("checkpoints", nargs="*")
    _add_dataclass_args(p, TuneConfig)
    add_fuse_options(p)
    p.set_defaults(run=cmd_tune)
    p = sub.add_parser("interpolate", help="accuracy and loss between two models, vanilla and aligned: CSV and PNG")
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("--points", type=int, default=11, help="alphas from 0 to 1 (default: 11)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--results-dir", default="results")
    add_fuse_options(p)
    p.set_defaults(run=cmd_interpolate)


def run_main(fn) -> int:
    """Run `fn()`; a bad input becomes one line on stderr and exit code 2."""
    try:
        return fn()
    except OtfuseError as exc:
        print(f"otfuse: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("otfuse: interrupted", file=sys.stderr)
        return 130


def given_options(argv: list[str]) -> set[str]:
    """Dest names of the --options written on the command line (they override a --config file)."""
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args._given = given_options(argv)
    return run_main(lambda: args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
