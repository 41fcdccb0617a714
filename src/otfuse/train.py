"""Seeded, resumable training of one model, on one device or many (DDP via torchrun).

    otfuse train --dataset fashion-mnist --width 16 --epochs 4 --seed 0
    torchrun --nproc_per_node=8 -m otfuse train --dataset cifar10 --epochs 50

Every hyperparameter lives in `TrainConfig`, with its unit. The seed fixes the initial weights,
the data order and the augmentation (drawn per epoch from (seed, epoch)), so `--resume` after an
interruption gives the same weights as a run never interrupted (bit for bit on the CPU).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from otfuse.checkpoints import (
    OPTIMIZERS,
    check_data_digest,
    fused_from_fitted_parents,
    load_checkpoint,
    optimizer_of,
    pick_device,
    recorded_meta,
    save_checkpoint,
    val_size_of,
)
from otfuse.data import ImageData, batches, dataset_slug, default_data_dir, load_dataset, resolved_name
from otfuse.distill import distill_loss, target_probs
from otfuse.errors import OtfuseError
from otfuse.evaluate import accuracy, accuracy_of_logits, logits, task_accuracy_of_logits
from otfuse.models import MAX_WIDTH, TIMM, arch_folder, arch_width, build_model, check_arch
from otfuse.optim import lr_at, make_optimizer
from otfuse.precision import Precision, autocast, channels_last, cpu_flags, full_float32, memory_format, resolve_precision
from otfuse.storage import atomic_write_csv, check_outputs, load_torch, output_lock
from otfuse.subsets import (
    MAX_PARTIES,
    PARTITIONS,
    Partition,
    Parts,
    Subset,
    check_bias,
    classes_of,
    format_classes,
    is_parts_record,
    parse_classes,
    part_from_record,
    parts_of,
    restrict,
)


@dataclass
class TrainConfig:
    dataset: str = "digits"  # a name otfuse.data.load_dataset knows
    arch: str = "resnet18"
    width: int = 64  # base channels of the first stage
    epochs: int = 30
    batch_size: int = 256  # images per optimiser step, all ranks together
    lr: float = 0.2  # peak learning rate
    warmup: float = 0.2  # fraction of all steps spent warming up linearly from lr/10 to lr
    optimizer: str = "sgd"  # sgd (Nesterov, --momentum) | adamw (betas 0.9, 0.999; what transformers train with)
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    augment: bool = True  # the dataset's random crops and flips (where it has them) on every training batch
    seed: int = 0
    classes: str = ""  # train on these classes only, e.g. 0-49 or 0,3,5-9 (the head still covers every class); empty: all
    bias: float = 1.0  # with --classes: the listed classes' share of their images drawn, the others giving the rest (0.8: 80/20)
    split_seed: int = 0  # fixes which images --classes/--bias draw: parties with one split seed split the data exactly
    partition: str = ""  # iid | classes | dirichlet: train party --party of --parties under this split of every class
    parties: int = 2  # with --partition: how many parties split the data
    party: int = 1  # with --partition: which party this run trains (1 to --parties)
    alpha: float = 0.5  # with --partition dirichlet: the concentration (0.1: strong label skew; 100: nearly iid)
    min_size: int = 10  # with --partition dirichlet: training images every party holds at least (as Flower Datasets)
    init_seed: int = -1  # the initial weights' seed; -1: --seed. One value for every party: the federated shared start
    parts: str = ""  # set by finetune from a model of parties: the JSON list of their parts, whose union it trains on
    val_size: int = -1  # images held out of train for validation; -1: min(5000, 10%)
    data_dir: str = field(default_factory=lambda: str(default_data_dir()))
    checkpoint_dir: str = "checkpoint"
    device: str = "auto"  # auto: cuda when available
    precision: str = "auto"  # auto: bf16 autocast where the device has native bf16, else fp32 | fp32 | bf16
    resume: bool = False  # continue the interrupted run in the checkpoint (same options)
    overwrite: bool = False  # replace an existing checkpoint with a new run (otherwise refused)
    init: str = ""  # start from this checkpoint's weights instead of a fresh initialisation (fine-tuning)
    distill: bool = False  # label-free: learn the teachers' mean softmax instead of the labels
    teachers: str = ""  # comma-separated teacher checkpoints for --distill; empty: the --init checkpoint's parents
    temperature: float = 1.0  # softmax temperature of distillation (the loss is scaled by its square)
    distill_weight: float = 1.0  # with --distill: the teachers' share of the loss (1: label-free; the rest is the label loss)
    keep_start: bool = True  # with --init (fine-tuning): keep the starting weights if the run ends below them on the validation split
    proximal_mu: float = 0.0  # FedProx's proximal term: mu/2 times the squared distance of the weights from their start
    out: str = ""  # checkpoint path; empty: <checkpoint_dir>/<dataset>/<arch>-w<width>/seed<seed>.pt

    def check(self) -> None:
        """Ranges of every hyperparameter, before any work."""
        bad = [
            (self.epochs >= 1, "--epochs", "at least 1"),
            (self.batch_size >= 2, "--batch-size", "at least 2 (BatchNorm needs two images a batch)"),
            (0 < self.lr <= 100, "--lr", "a positive number, at most 100"),
            (0 <= self.warmup <= 1, "--warmup", "between 0 and 1 (a fraction of the steps)"),
            (self.optimizer in OPTIMIZERS, "--optimizer", " or ".join(OPTIMIZERS)),
            (0 <= self.momentum < 1, "--momentum", "between 0 and 1 (excluded)"),
            (0 <= self.weight_decay <= 10, "--weight-decay", "from 0 to 10"),
            (0 <= self.label_smoothing < 1, "--label-smoothing", "between 0 and 1 (excluded)"),
            (self.val_size >= -1, "--val-size", "-1 (the default split) or 0 or more"),
            (1 <= self.width <= MAX_WIDTH or self.arch.startswith(TIMM), "--width", f"from 1 to {MAX_WIDTH}"),
            (0 < self.temperature <= 1000, "--temperature", "a positive number, at most 1000"),
            (0 <= self.distill_weight <= 1, "--distill-weight", "between 0 and 1"),
            (0 <= self.proximal_mu <= 100, "--proximal-mu", "from 0 to 100"),
        ]
        for ok, flag, want in bad:
            if not ok:
                raise OtfuseError(f"{flag} {getattr(self, flag[2:].replace('-', '_'))} must be {want}")
        check_bias(self.bias)
        if self.bias != 1.0 and not self.classes:
            raise OtfuseError(f"--bias {self.bias} weighs the classes --classes lists; give --classes too (e.g. --classes 0-4)")
        if self.split_seed != 0 and not (self.classes or self.partition):
            raise OtfuseError(
                f"--split-seed {self.split_seed} fixes which images --classes or --partition draws; give one too (e.g. --classes 0-4)"
            )
        self._check_partition()
        resolve_precision(self.precision, torch.device("cpu"))  # the name only; the device decides later
        if self.arch.startswith(TIMM) and self.width not in (0, TrainConfig.width):
            raise OtfuseError(f"--width {self.width}: timm models have no width knob; leave --width out for --arch {self.arch}")
        if self.resume and self.overwrite:
            raise OtfuseError("--resume and --overwrite contradict each other; give one")
        if self.resume and self.proximal_mu:
            raise OtfuseError(
                f"--proximal-mu {self.proximal_mu} anchors the weights at the run's start, which a resumed run lacks; train again"
            )

    def _check_partition(self) -> None:
        defaults = {f: getattr(TrainConfig, f) for f in ("parties", "party", "alpha", "min_size")}
        if not self.partition:
            changed = [f for f, v in defaults.items() if getattr(self, f) != v]
            if changed:
                flag = "--" + changed[0].replace("_", "-")
                raise OtfuseError(
                    f"{flag} {getattr(self, changed[0])} belongs to a partition; give --partition iid, classes or dirichlet too"
                )
            return
        bad = [
            (self.partition in PARTITIONS, "--partition", " or ".join(PARTITIONS)),
            (not self.classes, "--partition", "given without --classes (a party's classes come from the partition)"),
            (2 <= self.parties <= MAX_PARTIES, "--parties", f"from 2 to {MAX_PARTIES}"),
            (1 <= self.party <= self.parties, "--party", f"from 1 to --parties ({self.parties})"),
            (0 < self.alpha <= 1e6, "--alpha", "a positive number, at most 1e6"),
            (0 <= self.min_size < 2**31, "--min-size", "0 or more"),
        ]
        for ok, flag, want in bad:
            if not ok:
                raise OtfuseError(f"{flag} {getattr(self, flag[2:].replace('-', '_'))} must be {want}")


# options that define a run: resuming with other values would make the checkpoint's metadata lie
RUN_OPTIONS = (
    "dataset",
    "arch",
    "width",
    "epochs",
    "batch_size",
    "lr",
    "warmup",
    "optimizer",
    "momentum",
    "weight_decay",
    "label_smoothing",
    "augment",
    "seed",
    "classes",
    "bias",
    "split_seed",
    "partition",
    "parties",
    "party",
    "alpha",
    "min_size",
    "init_seed",
    "parts",
    "val_size",
    "init",
    "distill",
    "teachers",
    "temperature",
    "distill_weight",
)


# Fine-tuning a fused model: a gentler peak, and no augmentation, which a single epoch does not need
# (validation, one epoch from the default fusion: Fashion-MNIST 93.02 without, 91.96 with; bench/finetune-settings-*.csv)
FINETUNE = {"epochs": 1, "lr": 0.05, "warmup": 0.1, "augment": False}
# ... and a fusion of parents that fit their training set: every plain recipe measured on the shared width-64 pair ended
# below the fusion on validation (89.44: 1 epoch at lr 0.05 88.72, at 0.005 89.26, 2 epochs at 0.02 89.30); 2 epochs
# at 0.02 with crops and flips and half the loss from the parents' ensemble ended above it, 89.58
# (bench/finetune-cifar10-jpeg-w64.csv; docs/measurements.md)
FINETUNE_FITTED = {"epochs": 2, "lr": 0.02, "warmup": 0.1, "augment": True, "distill": True, "distill_weight": 0.5}


# ... and a model trained with AdamW (the registry's ViT): the same gentler schedule in AdamW's units, a quarter of
# the peak its training used (2e-3 for the ViT, docs/measurements.md), as FINETUNE is of SGD's 0.2
FINETUNE_ADAMW = {"epochs": 1, "lr": 5e-4, "warmup": 0.1, "augment": False, "optimizer": "adamw", "weight_decay": 0.05}


def finetune_defaults(meta: dict) -> dict:
    """otfuse finetune's defaults for the checkpoint with metadata `meta`: FINETUNE_ADAMW for models trained with
    AdamW, FINETUNE_FITTED for a fusion whose parents fit their training set (its parents teach), FINETUNE otherwise
    (the underfit width-16 proxies, trained models)."""
    if optimizer_of(meta) == "adamw":
        return FINETUNE_ADAMW
    return FINETUNE_FITTED if fused_from_fitted_parents(meta) else FINETUNE


PROGRESS_EVERY = 20  # optimiser steps between progress-bar updates (each reads the running loss from the device)


def checkpoint_path(cfg: TrainConfig) -> Path:
    """--out, or <checkpoint_dir>/<dataset>/<arch>-w<width>/seed<seed>[-<part>].pt (a party's part: c0-49, c0-4-b0.8)."""
    if cfg.out:
        return Path(cfg.out)
    part = f"-c{cfg.classes.replace(',', '_')}" + ("" if cfg.bias == 1.0 else f"-b{cfg.bias:g}") if cfg.classes else ""
    if cfg.partition:
        part = f"-{_partition(cfg).tag}" + ("" if cfg.init_seed < 0 else f"-i{cfg.init_seed}")
    return Path(cfg.checkpoint_dir) / dataset_slug(cfg.dataset) / arch_folder(cfg.arch, cfg.width) / f"seed{cfg.seed}{part}.pt"


def training_parts(cfg: TrainConfig, data: ImageData) -> Parts | None:
    """The part of `data` the run trains on (--classes, --bias, --split-seed), or the union of parties' parts a
    model made from them learnt from (`parts`), or None for all of it."""
    if cfg.parts:
        if cfg.classes:
            raise OtfuseError(f"--classes {cfg.classes} and parts {cfg.parts[:60]}: give one")
        try:
            records = json.loads(cfg.parts)
            return tuple(part_from_record(r) for r in records) if is_parts_record(records, data.num_classes) else _no_parts(cfg)
        except ValueError:
            return _no_parts(cfg)
    if cfg.partition:
        if cfg.partition == "classes" and cfg.parties > data.num_classes:
            raise OtfuseError(f"--partition classes --parties {cfg.parties}: {cfg.dataset} has {data.num_classes} classes to share out")
        part = _partition(cfg)
        part.bounds(data.train_y, data.num_classes)  # a Dirichlet draw that cannot meet --min-size: refused here, before the lock
        return (part,)
    return (Subset(parse_classes(cfg.classes, data.num_classes), cfg.bias, cfg.split_seed),) if cfg.classes else None


def _partition(cfg: TrainConfig) -> Partition:
    return Partition(cfg.partition, cfg.parties, cfg.party, cfg.alpha, cfg.min_size, cfg.split_seed)


def _no_parts(cfg: TrainConfig):
    raise OtfuseError(f"parts {cfg.parts[:60]!r} is not a JSON list of parts (classes, bias, seed); leave it out")


def _dist() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train(cfg: TrainConfig, data: ImageData | None = None, progress: bool = True, start: dict[str, torch.Tensor] | None = None) -> Path:
    """Train (or resume) the model `cfg` describes; returns the checkpoint path. `start`: the weights to begin from
    (a federated round's global model) instead of a fresh initialisation."""
    cfg.check()
    cfg = replace(cfg, dataset=resolved_name(cfg.dataset))  # a relative path recorded as given would mean other data elsewhere
    rank, world = _dist()
    path = checkpoint_path(cfg)
    _check_paths(cfg, path)
    check_arch(cfg.arch)
    device = pick_device(cfg.device)
    if world > 1:  # before the data: rank 0 decodes (or downloads) it while the others wait for its cache
        device = _init_distributed(device, rank)
    if data is None:  # before the lock, which makes the checkpoint's folder: a bad dataset must leave nothing behind
        data = load_dataset_on_ranks(cfg.dataset, cfg.data_dir, None if cfg.val_size < 0 else cfg.val_size, rank, world)
    training_parts(cfg, data)  # a bad --classes is refused before the lock too
    with output_lock(path, path.with_suffix(".csv")) if rank == 0 else nullcontext():
        return _train(cfg, path, data, progress, rank, world, device, start)


def load_dataset_on_ranks(name: str, data_dir: str | Path, val_size: int | None, rank: int, world: int) -> ImageData:
    """`load_dataset` in every process of a distributed run, decoded (or downloaded) once: rank 0 first, then the
    others from its cache. Every rank writing the same cache and download folder at once would race; rank 0's
    outcome is sent to the others, so a bad dataset is the same one-line error everywhere, never a rank left waiting."""
    if world == 1:
        return load_dataset(name, data_dir, val_size)
    data, failure = None, [None]
    if rank == 0:
        try:
            data = load_dataset(name, data_dir, val_size)
        except OtfuseError as exc:
            failure = [str(exc)]
    torch.distributed.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise OtfuseError(failure[0])
    return data if data is not None else load_dataset(name, data_dir, val_size)


def _check_paths(cfg: TrainConfig, path: Path) -> None:
    """The checkpoint and its per-epoch log (`path` with .csv) are two files, neither the --init checkpoint nor a
    teacher; an existing log is replaced only when it is an otfuse log (the checkpoint's own rules: _check_existing)."""
    if path.suffix == ".csv":
        raise OtfuseError(
            f"checkpoint {path} ends in .csv, the name of its own per-epoch log, which would replace it "
            "every epoch; give a path ending in .pt"
        )
    if path.is_file() and not cfg.overwrite:
        load_torch(path)  # a damaged checkpoint there is the problem to name, before its log's
    teachers = {f"teacher {t}": t for t in cfg.teachers.split(",") if t.strip()} if cfg.distill else {}
    check_outputs(
        {"checkpoint": path, "the per-epoch log": path.with_suffix(".csv")},
        {"the checkpoint it starts from": cfg.init, **teachers},
        overwrite=cfg.overwrite,
        own=lambda p: p == path or (p.suffix == ".csv" and is_log_of(p, path)),
    )


def is_log_of(log: Path, checkpoint: Path) -> bool:
    """Whether `log` is the per-epoch log of the otfuse checkpoint `checkpoint`: its rows are those of the checkpoint's
    history (all of them, or all but the last epoch's, where a run stopped between the two writes). A file that only
    looks like a log (a header starting with `epoch,`) is not."""
    try:
        history = load_torch(checkpoint)["meta"]["history"]
        with open(log, newline="") as f:
            rows = list(csv.reader(f))
    except (OtfuseError, OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError):
        return False
    want = [LOG_COLUMNS] + [_log_row(h) for h in history]
    return bool(history) and rows in (want, want[:-1])


def _train(
    cfg: TrainConfig, path: Path, data: ImageData, progress: bool, rank: int, world: int, device: torch.device, weights: dict | None = None
) -> Path:
    precision = resolve_precision(cfg.precision, device)
    if cfg.batch_size % world:
        raise OtfuseError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    _check_existing(path, cfg, precision)
    parts = training_parts(cfg, data)
    task = classes_of(parts, data.num_classes)  # a party's own task: its classes
    held_out = len(data.val_y)  # the validation split as the dataset holds it out, before the part restricts it
    data = restrict(data, parts)  # train and validation splits follow the parts; the test split stays whole (joint accuracy)
    empty = sorted(set(task) - set(data.train_y.unique().tolist()))
    if parts and empty and all(isinstance(p, Subset) for p in parts):  # a Dirichlet party may lack classes by design
        raise OtfuseError(
            f"--classes {cfg.classes or format_classes(task)} --bias {cfg.bias:g} draws no training image of class "
            f"{format_classes(empty)} (too small a share); raise --bias"
        )
    if len(data.train_y) // cfg.batch_size < 1:
        raise OtfuseError(
            f"--batch-size {cfg.batch_size} exceeds the {len(data.train_y)} training images of {cfg.dataset}: "
            "an epoch would take no step; use a smaller batch"
        )
    teachers, teacher_record = _teachers(cfg, data) if cfg.distill else ([], {})
    torch.manual_seed(cfg.seed if cfg.init_seed < 0 else cfg.init_seed)
    model = build_model(cfg.arch, arch_width(cfg.arch, cfg.width), data.in_channels, data.num_classes, data.image_size)
    if cfg.init_seed >= 0:  # the shared start drawn; the run's own randomness from its seed, as every other run's
        torch.manual_seed(cfg.seed)
    _check_takes(model, cfg.arch, data)
    opt = make_optimizer(model, cfg)
    start, history = 0, []
    if cfg.resume and path.is_file():
        start, history = _restore(path, cfg, model, opt, data)
    elif cfg.init:
        model.load_state_dict(_compatible(cfg.init, "--init", cfg, data)[0].state_dict())
    elif weights is not None:
        model.load_state_dict(weights)
    model.to(device, memory_format=memory_format(precision))
    anchor = [p.detach().clone() for p in model.parameters()] if cfg.proximal_mu else []
    _optimizer_to(opt, device)
    gpu_data = data.to(device)
    teachers = [t.to(device, memory_format=memory_format(precision)) for t in teachers]
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    steps_per_epoch = (len(data.train_y) // world) // (cfg.batch_size // world)
    total = steps_per_epoch * cfg.epochs
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    meta = {
        **_meta(cfg, data),
        **teacher_record,
        "val_size": held_out,
        "precision": precision.value,
        **_parts_record(cfg, parts),
    }
    with onednn_where_it_is_sound(model, device):
        for epoch in range(start, cfg.epochs):
            t0 = time.time()
            model.train()
            bar = tqdm(
                batches(
                    gpu_data.train_x,
                    gpu_data.train_y,
                    cfg.batch_size // world,
                    data.norm,
                    augment=data.augment and cfg.augment,
                    seed=cfg.seed,
                    epoch=epoch,
                    rank=rank,
                    world=world,
                    drop_last=True,
                ),
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=True if not progress or rank != 0 else None,
                leave=False,
            )
            # running sums stay on the device: one host sync per epoch (and per progress update), not two per step
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            for i, (xb, yb) in enumerate(bar):
                for g in opt.param_groups:
                    g["lr"] = lr_at(epoch * steps_per_epoch + i, total, cfg)
                xb = channels_last(xb, precision)
                with autocast(precision, device):
                    out = net(xb)
                    loss = loss_fn(out.float(), yb) if not teachers or cfg.distill_weight < 1 else 0.0
                    if teachers:
                        w = cfg.distill_weight
                        loss = w * _teacher_loss(out, teachers, xb, cfg.temperature) + (1 - w) * loss
                    if anchor:
                        loss = loss + cfg.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * len(yb)
                correct += (out.argmax(1) == yb).sum()
                seen += len(yb)
                if not bar.disable and i % PROGRESS_EVERY == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100 * correct.item() / seen:.1f}")
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum.item() / max(seen, 1),
                "train_acc": 100 * correct.item() / max(seen, 1),
                "seconds": time.time() - t0,
            }
            if rank == 0:
                row["val_acc"] = accuracy(model, gpu_data.val_x, gpu_data.val_y, data.norm, precision) if len(data.val_y) else float("nan")
                if epoch + 1 == cfg.epochs:
                    z = logits(model, gpu_data.test_x, data.norm, precision=precision)
                    row["test_acc"] = accuracy_of_logits(z, gpu_data.test_y)
                    if len(task) < data.num_classes:  # a party's own task: its classes' test images, argmax within them
                        meta["task_test_acc"] = task_accuracy_of_logits(z, gpu_data.test_y, task)
                history.append(row)
                meta.update(epoch=epoch + 1, history=history, **{k: v for k, v in row.items() if k.endswith("acc")})
                if epoch + 1 == cfg.epochs and cfg.init and cfg.keep_start and len(data.val_y):
                    meta.update(_keep_better_start(model, cfg, data, gpu_data, precision, row["val_acc"], progress))
                save_checkpoint(path, model, meta, optimizer=opt.state_dict())
                _write_log(path.with_suffix(".csv"), history)
                if progress:
                    shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch")
                    print(f"epoch {epoch + 1}/{cfg.epochs}: {shown}", flush=True)
            if world > 1:
                torch.distributed.barrier()
    if world > 1:
        torch.distributed.destroy_process_group()
    return path


def _keep_better_start(
    model: nn.Module, cfg: TrainConfig, data: ImageData, gpu_data: ImageData, precision: Precision, final_val: float, progress: bool
) -> dict:
    """A fine-tune never ends below the model it started from on the validation split: when the start scores
    higher there, its weights replace the run's (the run's own curve stays in `history`). Returns the metadata
    to record: the start's validation accuracy, and, where the start was kept, its accuracies."""
    start = _compatible(cfg.init, "--init", cfg, data)[0].to(next(model.parameters()).device)
    start_val = accuracy(start, gpu_data.val_x, gpu_data.val_y, data.norm, precision)
    if final_val >= start_val:
        return {"start_val_acc": start_val, "kept_start": False}
    model.load_state_dict(start.state_dict())
    test = accuracy(model, gpu_data.test_x, gpu_data.test_y, data.norm, precision)
    if progress:
        print(
            f"the start scores higher on the validation split ({start_val:.2f} against {final_val:.2f}): its weights are kept", flush=True
        )
    return {"start_val_acc": start_val, "kept_start": True, "val_acc": start_val, "test_acc": test}


def finetune(
    init: str | Path, out: str | Path, data_dir: str, device: str = "auto", data: ImageData | None = None, progress: bool = False, **changes
) -> Path:
    """Fine-tune checkpoint `init` with its `finetune_defaults` (and `changes`, e.g. epochs=2) into `out`;
    returns `out`. Dataset, architecture, width, validation split and seed come from the checkpoint."""
    return train(finetune_config(load_checkpoint(init)[1], init, out, data_dir=data_dir, device=device, **changes), data, progress)


def finetune_config(meta: dict, init: str | Path, out: str | Path, **changes) -> TrainConfig:
    """The fine-tuning run of the checkpoint with metadata `meta`: its `finetune_defaults`, then `changes`."""
    from_ckpt = {
        "dataset": meta["dataset"],
        "arch": meta["arch"],
        "width": meta["width"],
        "val_size": -1 if val_size_of(meta) is None else val_size_of(meta),
        "seed": int(meta.get("seed", 0)),
    }
    parts = parts_of(meta)  # a party goes on with its own part of the data, a model of parties with their union
    if parts and len(parts) == 1 and isinstance(parts[0], Partition):
        p = parts[0]
        from_ckpt.update(partition=p.kind, parties=p.parties, party=p.party, alpha=p.alpha, min_size=p.min_size, split_seed=p.seed)
    elif parts and len(parts) == 1:
        from_ckpt.update(classes=format_classes(parts[0].classes), bias=parts[0].bias, split_seed=parts[0].seed)
    elif parts:
        from_ckpt.update(parts=json.dumps([p.to_meta() for p in parts]))
    return TrainConfig(**{**from_ckpt, **finetune_defaults(meta), **changes, "init": str(init), "out": str(out)})


@full_float32()  # a structure probe: float32 means float32 on a GPU too
def _check_takes(model: nn.Module, arch: str, data: ImageData) -> None:
    """One image through the fresh model: an architecture built for other images (a square-only vit on 16 x 24
    pictures, a timm model of a fixed input size) is one line before any training, not a traceback in the first step."""
    x = torch.zeros(2, *data.train_x.shape[1:])
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, ValueError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise OtfuseError(
            f"--arch {arch} cannot take {data.name}'s {x.shape[-2]} x {x.shape[-1]} images ({first}); "
            "choose another --arch (resnet18 takes any size)"
        ) from None
    finally:
        model.train()


def _parts_record(cfg: TrainConfig, parts: Parts | None) -> dict:
    """The metadata of what the run learnt from: `subset` for a party's own part, `parts` for a union of parties'."""
    if parts is None:
        return {}
    return {"parts": [p.to_meta() for p in parts]} if cfg.parts else {"subset": parts[0].to_meta()}


def _meta(cfg: TrainConfig, data: ImageData) -> dict:
    return {
        "kind": "trained",
        "arch": cfg.arch,
        "width": arch_width(cfg.arch, cfg.width),
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
        "dataset": cfg.dataset,
        "data_digest": data.digest,  # what the data is, whatever its path: checked wherever the checkpoint is used
        "mean": list(data.mean),
        "std": list(data.std),
        "val_size": len(data.val_y),
        "seed": cfg.seed,
        "classes": list(data.classes),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("resume", "overwrite")},
        # the start as an absolute path with its weights' checksum: a relative one would name another file elsewhere
        **(
            {"kind": "finetuned", "init": _absolute(cfg.init), "init_digest": recorded_meta(cfg.init).get("weights_digest")}
            if cfg.init
            else {}
        ),
    }


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _teachers(cfg: TrainConfig, data: ImageData) -> tuple[list[nn.Module], dict]:
    """The teacher models of --distill (--teachers, or the parents the --init checkpoint was fused from, which must be
    the files it recorded, unchanged), and their record for the metadata: absolute paths and weights' checksums."""
    paths = [p for p in cfg.teachers.split(",") if p]
    recorded: list = []  # the checksums the --init checkpoint recorded for its parents; none for --teachers
    if not paths and cfg.init:
        init = load_checkpoint(cfg.init)[1]
        paths = list(init.get("parents") or [])
        recorded = init.get("parent_digests") if isinstance(init.get("parent_digests"), list) else [None] * len(paths)
    if not paths:
        raise OtfuseError("--distill needs teachers: fine-tune a fused checkpoint (its parents teach) or give --teachers A.pt,B.pt")
    out, digests = [], []
    for i, p in enumerate(paths):
        if not cfg.teachers and not Path(p).is_file():
            raise OtfuseError(
                f"--distill learns from the parents {cfg.init} was fused from, but {p} does not exist (moved?); "
                "give --teachers A.pt,B.pt, or --no-distill"
            )
        model, meta, _ = load_checkpoint(p)
        if recorded and (not Path(p).is_absolute() or i >= len(recorded) or recorded[i] != meta.get("weights_digest")):
            raise OtfuseError(
                f"--distill learns from the parents {cfg.init} was fused from, but they are recorded as relative paths "
                "(an older fusion) or have changed since the fusion; give --teachers A.pt,B.pt"
            )
        if meta["num_classes"] != data.num_classes or meta["in_channels"] != data.in_channels:
            raise OtfuseError(
                f"--teachers: {p} classifies {meta['num_classes']} classes of {meta['in_channels']}-channel images, "
                f"this run {data.num_classes} of {data.in_channels}; use teachers trained on {cfg.dataset}"
            )
        check_data_digest(meta, data, f"teacher {p}")
        if resolved_name(meta["dataset"]) != resolved_name(cfg.dataset) or meta.get("classes", data.classes) != data.classes:
            raise OtfuseError(
                f"--teachers: {p} was trained on {meta['dataset']}"
                + (" with other class names" if meta["dataset"] == cfg.dataset else "")
                + f", this run is on {cfg.dataset}; use teachers trained on the same data"
            )
        out.append(model.eval().requires_grad_(False))
        digests.append(meta.get("weights_digest"))
    return out, {"teachers": [_absolute(p) for p in paths], "teachers_digests": digests}


def _teacher_loss(out: torch.Tensor, teachers: list[nn.Module], xb: torch.Tensor, temperature: float) -> torch.Tensor:
    """Distillation towards the teachers' mean softmax at `temperature`."""
    with torch.no_grad():
        target = target_probs([t(xb) for t in teachers], torch.full((len(teachers),), 1 / len(teachers)), temperature, probs=True)
    return distill_loss(out, target, temperature)


def _check_existing(path: Path, cfg: TrainConfig, precision: Precision) -> None:
    """A checkpoint already at `path` is continued only with --resume (and the same options), replaced
    only with --overwrite: a finished or interrupted run is never lost by accident."""
    if not path.exists() or cfg.overwrite:
        return  # with --resume and nothing to resume: a fresh run, as run_train_all.sh relies on
    saved = load_checkpoint(path)[1]
    done = f"epoch {saved.get('epoch', '?')} of {(saved.get('config') or {}).get('epochs', '?')}"
    if not cfg.resume:
        raise OtfuseError(
            f"checkpoint {path} already exists ({done}); add --resume to continue it, "
            "--out to write a new one elsewhere, or --overwrite to replace it"
        )
    old = saved.get("config") or {}
    same = lambda k, v: resolved_name(str(v)) == cfg.dataset if k == "dataset" else v == getattr(cfg, k)
    changed = [k for k in RUN_OPTIONS if k in old and not same(k, old[k])]
    if changed:
        k = changed[0]
        raise OtfuseError(
            f"--resume: {path} was trained with {k}={old[k]!r} but this run asks for {getattr(cfg, k)!r}; "
            f"resume with the same options, or start a new run with --out"
        )
    if saved.get("precision", "fp32") != precision:
        raise OtfuseError(
            f"--resume: {path} was trained in {saved.get('precision', 'fp32')} but this run resolves to {precision}; "
            f"resume with --precision {saved.get('precision', 'fp32')} (a run changing precision is not bit-exact)"
        )


def _compatible(path, flag: str, cfg: TrainConfig, data: ImageData):
    """load_checkpoint(path), after checking it holds the model this run trains."""
    saved, meta, ckpt = load_checkpoint(path)
    if resolved_name(meta["dataset"]) != resolved_name(cfg.dataset):
        raise OtfuseError(
            f"{flag}: checkpoint {path} was trained on {meta['dataset']} but this run is on {cfg.dataset}; "
            "use another checkpoint or matching options"
        )
    check_data_digest(meta, data, f"{flag} checkpoint {path}")
    if meta.get("shapes"):
        raise OtfuseError(
            f"{flag}: checkpoint {path} is a budgeted fusion (some layers wider than width {meta['width']}), which "
            "otfuse trains from no further; evaluate it, or fine-tune a fusion made without --budget"
        )
    want = {"arch": cfg.arch, "width": cfg.width, "in_channels": data.in_channels, "num_classes": data.num_classes}
    for k, v in want.items():
        if meta.get(k) != v:
            raise OtfuseError(
                f"{flag}: checkpoint {path} has {k}={meta.get(k)!r} but this run has {v!r}; use another checkpoint or matching options"
            )
    return saved, meta, ckpt


def _restore(path: Path, cfg: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer, data: ImageData):
    saved, meta, ckpt = _compatible(path, "--resume", cfg, data)
    if "optimizer" not in ckpt:
        raise OtfuseError(f"--resume: checkpoint {path} holds no optimiser state (a fused model?); train without --resume")
    model.load_state_dict(saved.state_dict())
    opt.load_state_dict(ckpt["optimizer"])
    return int(meta["epoch"]), list(meta.get("history", []))


def onednn_where_it_is_sound(model: nn.Module, device: torch.device):
    """A context for training `model` on `device`: oneDNN off on the CPU where the model has a strided 1x1 convolution
    with fewer input channels than oneDNN's block (8 on AVX2, 16 on AVX-512), whose weight gradient then writes past
    its workspace (oneDNN issue 6035). That corrupts the heap and aborts the
    process later, elsewhere (a ResNet18 of width 4 or 8 has such a shortcut). PyTorch's own kernels run instead."""
    block = 16 if "avx512f" in cpu_flags() else 8
    risky = device.type == "cpu" and any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < block for m in model.modules()
    )
    return _onednn_off() if risky and torch.backends.mkldnn.is_available() else nullcontext()


@contextmanager
def _onednn_off() -> Iterator[None]:
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def _optimizer_to(opt: torch.optim.Optimizer, device: torch.device) -> None:
    # AdamW's step counter stays on the CPU, where torch keeps it (on a GPU it would cost a host sync per parameter per step)
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


def _init_distributed(device: torch.device, rank: int) -> torch.device:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return device


LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "val_acc", "test_acc", "seconds"]


def _log_row(row: dict) -> list[str]:
    return [f"{row[k]:.4f}" if isinstance(row.get(k), float) and not math.isnan(row[k]) else str(row.get(k, "")) for k in LOG_COLUMNS]


def _write_log(path: Path, history: list[dict]) -> None:
    atomic_write_csv(path, [dict(zip(LOG_COLUMNS, _log_row(r))) for r in history], LOG_COLUMNS)
