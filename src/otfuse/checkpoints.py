"""Checkpoints: models saved with their metadata, loaded safely, and loaded as parents to fuse.

    save_checkpoint("fused.pt", model, meta)                 # atomic; refuses non-finite weights
    model, meta, ckpt = load_checkpoint("seed0.pt")           # torch.load(weights_only=True): no code runs
    models, metas, data = load_parents(["a.pt", "b.pt"], data_dir, "auto")

A checkpoint holds `state_dict`, `meta` (architecture, width, channels, classes, dataset,
normalisation, validation split, seed, kind: trained | finetuned | fused, ...) and, for a training
run, the optimiser state.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from pathlib import Path

import torch
from torch import nn

from otfuse.data import ImageData, dataset_augments, load_dataset, resolved_name
from otfuse.errors import OtfuseError
from otfuse.models import MAX_WIDTH, model_from_meta
from otfuse.storage import load_torch, save_torch
from otfuse.subsets import is_part_record, is_parts_record, parts_of, union_of
from otfuse.version import __version__

# metadata every otfuse checkpoint has, with its type
REQUIRED = {"arch": str, "width": int, "in_channels": int, "num_classes": int, "dataset": str, "mean": list, "std": list}
MATCH = ("arch", "in_channels", "num_classes")  # what parents to fuse must share beside their data (the width may differ)
MAX_ABS = (
    1e18  # its square overflows float32: no trained network holds it (a fusion of underfit parents can hold BatchNorm variances of 1e6)
)
OPTIMIZERS = ("sgd", "adamw")  # what otfuse train can use, so what a checkpoint may record
FITS = 99.0  # training accuracy (%) from which a parent counts as fitting its (augmented) training set


def pick_device(name: str) -> torch.device:
    """`auto` (cuda when available), `cpu`, `cuda` or `cuda:N`; anything else is one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise OtfuseError(f"--device {name}: no CUDA device here; use --device cpu")
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise OtfuseError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0 ..")
        return torch.device(name)
    raise OtfuseError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")


def non_finite(model: nn.Module) -> list[str]:
    """Names of the model's floating-point tensors holding NaN or infinite values."""
    return [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, **extra) -> None:
    """A checkpoint that loads with weights_only=True; a model with non-finite weights is refused, not saved."""
    bad = non_finite(model)
    if bad:
        raise OtfuseError(
            f"refusing to save {path}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}); "
            "lower the learning rate or check the inputs"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # channels_last weights saved plainly
    save_torch(path, {"state_dict": state, "meta": {**meta, "version": __version__, "weights_digest": weights_digest(state)}, **extra})


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """A checksum of a state dict as stored (names, dtypes, shapes and bytes): torch does not check its zip's CRCs, so
    a flipped bit in a weight would load without a word."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict, dict]:
    """(model in eval mode, meta, the whole checkpoint dict), or one clear error for a file that is not a
    sound otfuse checkpoint: foreign, corrupt, with missing or mistyped metadata, tensors of the wrong
    dtype or shape, negative BatchNorm variances, non-finite or implausibly large weights."""
    ckpt = load_torch(path)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "state_dict" not in ckpt:
        raise OtfuseError(f"checkpoint {path} is not an otfuse checkpoint (no metadata); give one written by otfuse train or fuse")
    _check_meta(path, meta)
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise OtfuseError(f"checkpoint {path}: its state_dict is not a mapping of names to tensors; re-create it")
    _check_shapes(path, meta, state)
    model = model_from_meta(meta)
    if "weights_digest" in meta and meta["weights_digest"] != weights_digest(state):  # checkpoints from before it carry none
        raise OtfuseError(
            f"checkpoint {path} is damaged: its weights differ from the checksum written when it was saved "
            "(a changed byte); re-create it or copy it again"
        )
    own = model.state_dict()
    for k, t in state.items():
        if k in own and t.is_floating_point() != own[k].is_floating_point():
            raise OtfuseError(
                f"checkpoint {path}: tensor {k} is {t.dtype}, not a {'floating-point' if own[k].is_floating_point() else 'integer'} "
                "tensor; re-create it"
            )
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OtfuseError(f"checkpoint {path} does not match its own metadata ({first[:120]}); re-create it") from None
    bad = non_finite(model)
    if bad:
        raise OtfuseError(f"checkpoint {path} holds NaN or infinite weights ({len(bad)} tensor(s), e.g. {bad[0]}); use a sound checkpoint")
    for k, t in model.state_dict().items():
        if k.endswith("running_var") and bool((t < 0).any()):
            raise OtfuseError(f"checkpoint {path}: BatchNorm variance {k} holds negative values; the file is damaged, re-create it")
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > MAX_ABS:
            raise OtfuseError(
                f"checkpoint {path}: tensor {k} holds a value of magnitude {float(t.abs().max()):.3g}, beyond any "
                f"trained network's ({MAX_ABS:.0e}); the file is damaged, re-create it"
            )
    return model.eval(), meta, ckpt


def _check_shapes(path: str | Path, meta: dict, state: dict) -> None:
    """The tensors the metadata's model would hold against those in the file, the model built without memory
    (the meta device): a small file whose metadata names a huge model is refused before anything is allocated."""
    try:
        with torch.device("meta"):
            want = {k: tuple(t.shape) for k, t in model_from_meta(meta).state_dict().items()}
    except (RuntimeError, NotImplementedError):  # a model that reads tensor values while it is built: load_state_dict checks
        return
    got = {k: tuple(t.shape) for k, t in state.items()}
    if want != got:
        names = sorted(set(want) ^ set(got))
        first = (
            f"{len(want)} tensors in the model, {len(got)} in the file, e.g. {names[0]}"
            if names
            else next(f"{k}: {want[k]} in the model, {got[k]} in the file" for k in want if want[k] != got[k])
        )
        raise OtfuseError(f"checkpoint {path} does not match its own metadata ({first[:160]}); re-create it")


def _check_meta(path: str | Path, meta: dict) -> None:
    """Every metadata field otfuse reads, with its type and range (one error naming the field)."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            got = "missing" if key not in meta else repr(meta[key])[:60]
            raise OtfuseError(f"checkpoint {path}: metadata {key} is {got}, not {what}; re-create it with otfuse train or fuse")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_shape(v) -> bool:
        return isinstance(v, list) and 1 <= len(v) <= 6 and all(is_int(x) and 1 <= x <= 1 << 20 for x in v)

    def numbers(v, n: int, low: float, high: float) -> bool:
        return (
            isinstance(v, list)
            and len(v) == n
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and low <= x <= high for x in v)
        )

    for key, kind in REQUIRED.items():
        need(
            isinstance(meta.get(key), kind) and not isinstance(meta.get(key), bool),
            key,
            "an integer" if kind is int else "a " + kind.__name__,
        )
    need(0 <= meta["width"] <= MAX_WIDTH, "width", f"a width from 0 to {MAX_WIDTH}")
    need(1 <= meta["in_channels"] <= 64, "in_channels", "a channel count from 1 to 64")
    need(2 <= meta["num_classes"] <= 100_000, "num_classes", "a class count from 2 to 100000")
    # pixels are read as values in [0, 1]: their mean lies in it, and their std in [1e-3 (the floor data.py gives a
    # constant channel), 1]
    n = meta["in_channels"]
    need(numbers(meta["mean"], n, 0.0, 1.0), "mean", f"{n} numbers from 0 to 1 (one per input channel, of pixels read as 0 to 1)")
    need(numbers(meta["std"], n, 1e-3, 1.0), "std", f"{n} numbers from 0.001 to 1 (one per input channel, of pixels read as 0 to 1)")
    optional = {
        "seed": (is_int, "an integer"),
        "val_size": (is_int, "an integer"),
        "epoch": (lambda v: is_int(v) and v >= 0, "an epoch count of 0 or more"),
        "image_size": (lambda v: is_int(v) and 1 <= v <= 4096, "an image side from 1 to 4096 pixels"),
        "kind": (lambda v: v in ("trained", "finetuned", "fused"), "trained, finetuned or fused"),
        "config": (lambda v: isinstance(v, dict), "a dict"),
        "history": (lambda v: isinstance(v, list), "a list"),
        "parents": (lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v), "a list of paths"),
        "classes": (
            lambda v: isinstance(v, list) and len(v) == meta["num_classes"] and all(isinstance(c, str) for c in v),
            f"a list of {meta['num_classes']} class names",
        ),
        "train_acc": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"),
        "subset": (lambda v: is_part_record(v, meta["num_classes"]), "a part of the data (classes, bias, seed)"),
        "parts": (lambda v: is_parts_record(v, meta["num_classes"]), "a list of parts of the data (classes, bias, seed)"),
        "parent_subsets": (
            lambda v: isinstance(v, list) and all(s is None or is_part_record(s, meta["num_classes"]) for s in v),
            "a list of parts of the data or nulls",
        ),
        "parent_optimizer": (lambda v: v in OPTIMIZERS, " or ".join(OPTIMIZERS)),
        "data_digest": (lambda v: isinstance(v, str) and len(v) <= 64, "a digest of the training data"),
        "weights_digest": (lambda v: isinstance(v, str) and len(v) <= 64, "a checksum of the weights"),
        "shapes": (
            lambda v: (
                isinstance(v, dict) and len(v) <= 4096 and all(isinstance(k, str) and len(k) <= 200 and is_shape(d) for k, d in v.items())
            ),
            "a map of tensor names to shapes (a budgeted fusion's layer widths)",
        ),
    }
    for key, (ok, what) in optional.items():
        if key in meta:
            need(ok(meta[key]), key, what)


def val_size_of(meta: dict) -> int | None:
    """The validation split the checkpoint's parents were trained without (None: the dataset's default)."""
    size = meta.get("val_size", (meta.get("config") or {}).get("val_size", -1))
    return None if not isinstance(size, int) or size < 0 else size


def data_of(meta: dict, data_dir: str | Path | None) -> ImageData:
    """The checkpoint's dataset, with the validation split it was trained without, and the classes it was
    trained on (a renamed, added or removed class folder would evaluate to nonsense without a word)."""
    data = load_dataset(meta["dataset"], data_dir, val_size_of(meta))
    want = meta.get("classes")
    if want is not None and list(data.classes) != list(want):
        diff = next(
            (
                f"{a!r} where it had {b!r}"
                + (
                    " (the same letters in another Unicode form, NFC or NFD, as a copy from macOS makes: rename the folder)"
                    if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)
                    else ""
                )
                for a, b in zip(data.classes, want)
                if a != b
            ),
            f"{len(data.classes)} classes where it had {len(want)}",
        )
        raise OtfuseError(
            f"dataset {meta['dataset']} has class {diff} (the checkpoint was trained on {', '.join(map(str, want[:5]))}"
            f"{', ...' if len(want) > 5 else ''}); give the data it was trained on"
        )
    check_data_digest(meta, data, f"the checkpoint trained on {meta['dataset']}")
    check_normalisation(meta, data.norm, f"the checkpoint trained on {meta['dataset']}", f"dataset {meta['dataset']}")
    return data


def check_normalisation(meta: dict, norm: tuple, what: str, other: str) -> None:
    """One clear error where `meta` records another pixel mean/std than `norm`: every command normalises with the
    dataset's own (`data.norm`), so a model trained under another would be evaluated, fused or tuned on wrong inputs."""
    want = (tuple(meta["mean"]), tuple(meta["std"]))
    if len(want[0]) != len(norm[0]) or any(abs(a - b) > 1e-5 for w, n in zip(want, norm) for a, b in zip(w, n)):
        shown = lambda m, s: f"mean {', '.join(f'{v:.4f}' for v in m)}, std {', '.join(f'{v:.4f}' for v in s)}"
        raise OtfuseError(
            f"{what} records its inputs normalised with {shown(*want)}, but {other} has {shown(*norm)}: it was trained "
            "on other data or its metadata was changed; give the data it was trained on"
        )


def check_data_digest(meta: dict, data: ImageData, what: str) -> None:
    """One clear error where `data` is not the data `meta` records it was trained on (its digest: the decoded arrays);
    checkpoints written before digests were recorded carry none and are accepted."""
    want = meta.get("data_digest")
    if want and data.digest and want != data.digest:
        raise OtfuseError(
            f"dataset {data.name} holds other images or labels than {what} was trained on (its content differs); "
            "give the data it was trained on"
        )


def same_data(a: dict, b: dict) -> bool:
    """Whether two checkpoints were trained on one dataset: equal data digests where both have one, else the same
    dataset name with its path resolved."""
    if a.get("data_digest") and b.get("data_digest"):
        return a["data_digest"] == b["data_digest"]
    return resolved_name(str(a.get("dataset"))) == resolved_name(str(b.get("dataset")))


def fits_training_set(meta: dict) -> bool:
    """Whether a trained parent fit its augmented training set: at least FITS% training accuracy, trained with the
    dataset's augmentation (a dataset without augmentation, e.g. digits, never counts)."""
    acc, recipe = meta.get("train_acc"), meta.get("config") or {}
    augmented = bool(recipe.get("augment")) and dataset_augments(str(meta.get("dataset", "")))
    return isinstance(acc, (int, float)) and acc >= FITS and augmented


def fused_from_fitted_parents(meta: dict) -> bool:
    """Whether a fused checkpoint's parents all fit their training set (their accuracies are stored at fusion)."""
    accs = meta.get("parent_train_acc") or []
    return (
        meta.get("kind") == "fused"
        and bool(accs)
        and dataset_augments(str(meta.get("dataset", "")))
        and all(isinstance(a, (int, float)) and a >= FITS for a in accs)
    )


def optimizer_of(meta: dict) -> str:
    """The optimiser a checkpoint was trained with (a fused one: its first parent's); sgd before it was recorded."""
    return str(meta.get("parent_optimizer") or (meta.get("config") or {}).get("optimizer") or "sgd")


# what a parent's metadata says of its own training and shapes, not of a model fused from it
DROPPED_WHEN_FUSED = frozenset("history config epoch train_acc val_acc test_acc subset task_test_acc parts parent_subsets shapes".split())


def fused_meta(metas: list[dict], parents: list[str], width: int, options: dict, test_acc: float | None) -> dict:
    """A fused checkpoint's metadata: the first parent's identity (dataset, normalisation, classes), the
    fused width and options, and what each parent was (path, width, training accuracy)."""
    meta = {k: v for k, v in metas[0].items() if k not in DROPPED_WHEN_FUSED}
    meta.update(
        kind="fused",
        width=width,
        parent_widths=[m["width"] for m in metas],
        method=options.get("method"),
        options=options,
        # absolute, with the weights' checksums: a path typed relative would name other files from another folder
        parents=[str(Path(p).expanduser().resolve()) for p in parents],
        parent_digests=[m.get("weights_digest") for m in metas],
        test_acc=test_acc,
        parent_train_acc=[m.get("train_acc") for m in metas],
        parent_optimizer=optimizer_of(metas[0]),
    )
    held_out = val_size_of(metas[0])  # the split every parent held out (a fusion refuses others); None: the default
    if held_out is not None:
        meta["val_size"] = held_out
    union = union_of([parts_of(m) for m in metas])
    if union is not None:  # parents trained on parts of the data: the fused model learnt from their union, no more
        meta["parts"] = [p.to_meta() for p in union]
    return meta


def recorded_meta(path: str | Path) -> dict:
    """The metadata of the otfuse checkpoint at `path`, or {} for anything else (a decision that reads it then says no)."""
    try:
        ckpt = load_torch(path)
    except OtfuseError:
        return {}
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    return meta if isinstance(meta, dict) else {}


def same_files(recorded: object, digests: object, paths: list[str | Path]) -> bool:
    """Whether checkpoints recorded as absolute paths with their weights' checksums are `paths`, unchanged since. A
    relative path (recorded before paths were absolute) names no file for certain, so it matches nothing."""
    if not isinstance(recorded, list) or not isinstance(digests, list) or len(recorded) != len(paths) or len(digests) != len(paths):
        return False
    given = [Path(p).expanduser().resolve() for p in paths]
    if any(not Path(str(r)).is_absolute() or Path(str(r)) != g for r, g in zip(recorded, given)):
        return False
    return all(d is not None and recorded_meta(g).get("weights_digest") == d for d, g in zip(digests, given))


def fused_from(path: str | Path, parents: list[str | Path]) -> bool:
    """Whether `path` is an earlier fusion of exactly these parents, in this order, as they are now: the one existing
    file a fusion may replace without --overwrite."""
    meta = recorded_meta(path)
    return meta.get("kind") == "fused" and same_files(meta.get("parents"), meta.get("parent_digests"), parents)


def finetuned_from(path: str | Path, init: str | Path) -> bool:
    """Whether `path` is an earlier fine-tune of checkpoint `init`, as it is now (its metadata says so): the one
    existing file a fine-tune of `init` may replace without --overwrite."""
    meta = recorded_meta(path)
    return meta.get("kind") == "finetuned" and same_files([meta.get("init")], [meta.get("init_digest")], [init])


def load_parents(
    paths: list[str | Path], data_dir: str | Path | None, device_name: str, same_width: bool = True
) -> tuple[list[nn.Module], list[dict], ImageData]:
    """(models on the device, their metadata, the first one's dataset on the device), after checking
    the checkpoints can be fused: one architecture, class count, dataset and validation split (and width)."""
    device = pick_device(device_name)
    loaded = [load_checkpoint(p) for p in paths]
    meta0 = loaded[0][1]
    wider = next((p for p, (_, m, _) in zip(paths, loaded) if m.get("shapes")), None)
    if wider is not None:
        raise OtfuseError(
            f"{wider} is a budgeted fusion (some layers wider than its width); it cannot be fused or fine-tuned "
            "again: fuse its parents (its metadata lists them) or evaluate it"
        )
    keys = MATCH + (("width",) if same_width else ())
    for path, (_, meta, _) in zip(paths[1:], loaded[1:]):
        if meta.get("classes") != meta0.get("classes"):
            diff = next(
                (f"{a!r} where it has {b!r}" for a, b in zip(meta.get("classes") or [], meta0.get("classes") or []) if a != b),
                "other class names",
            )
            raise OtfuseError(
                f"{path} was trained on classes that differ from {paths[0]}'s ({diff}); fuse models of one dataset's classes, in one order"
            )
        if not same_data(meta, meta0):
            raise OtfuseError(
                f"{path} was trained on {meta['dataset']} but {paths[0]} on {meta0['dataset']} (other data); "
                "fuse models trained on one dataset"
            )
        for k in keys:
            if meta.get(k) != meta0.get(k):
                raise OtfuseError(
                    f"{path} has {k}={meta.get(k)!r} but {paths[0]} has {meta0.get(k)!r}; "
                    f"fuse models of one architecture, {'width, ' if same_width else ''}class count and dataset"
                )
        check_normalisation(meta, (meta0["mean"], meta0["std"]), str(path), str(paths[0]))
        if val_size_of(meta) != val_size_of(meta0):
            raise OtfuseError(
                f"{path} was trained without a validation split of {val_size_of(meta)} images but {paths[0]} "
                f"without {val_size_of(meta0)}; fuse models trained on the same split"
            )
    data = data_of(meta0, data_dir).to(device)
    return [m.to(device) for m, _, _ in loaded], [meta for _, meta, _ in loaded], data
