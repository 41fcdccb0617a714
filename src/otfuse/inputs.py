"""What every fusion starts from: the parents (checked to be fusable), their data, the options resolved
once, and the target model. The CLI, the fusion scripts and the benches all prepare a fusion here.

    check_request(2, width=0, given={"method": "weight"})      # before any loading: bad options, one line
    inputs = fusion_inputs(["a.pt", "b.pt"], given={"method": "weight"})
    fuse(inputs.models, inputs.data.train_x, inputs.data.norm, inputs.cfg, target=inputs.target)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from otfuse.checkpoints import fits_training_set, load_parents
from otfuse.data import ImageData, converted, load_dataset
from otfuse.errors import OtfuseError
from otfuse.fusion import FuseConfig
from otfuse.models import MAX_WIDTH, model_from_meta
from otfuse.options import resolve
from otfuse.refit import RefitConfig
from otfuse.subsets import Parts, classes_of, fusion_mask, parts_of, public_dataset, union_mask

REFIT_IMAGES_PER_CLASS = 40  # on CIFAR-100's validation split 4,000 refit images beat 1,000 and 2,000 (bench/knobs-cifar100-w32.csv)


@dataclass
class FusionInputs:
    models: list[nn.Module]  # the parents, on the device
    metas: list[dict]  # their metadata
    paths: list[str]
    data: ImageData  # the first parent's dataset, on the device; its train split: the images the fusion reads (--fusion-data)
    cfg: FuseConfig  # defaults, then what the parents' recipe implies, then --config, then the options given
    width: int  # the fused model's
    target: nn.Module  # a fresh model of the fused width, on the device: `fuse(..., target=inputs.target)`
    parts: list[Parts | None]  # the parts of the data each parent learnt from (None: all of it)
    class_counts: torch.Tensor  # [parents, classes]: the training images of each class each parent learnt from

    @property
    def tasks(self) -> list[tuple[int, ...]] | None:
        """Each parent's own classes, where parents trained on class subsets (None where every parent may hold every class)."""
        tasks = [classes_of(p, self.data.num_classes) for p in self.parts]
        return None if all(len(t) == self.data.num_classes for t in tasks) else tasks  # iid and Dirichlet: every class


def check_request(
    n_checkpoints: int, width: int = 0, given: dict[str, Any] | None = None, config: str = "", one_allowed: bool = True
) -> None:
    """The request alone, before anything is loaded: the options given and in `config` (their ranges), the
    number of checkpoints and the fused `width` (0: the first parent's). One clear error for each."""
    if not 0 <= width <= MAX_WIDTH:
        raise OtfuseError(f"--width {width} must be from 1 to {MAX_WIDTH} (or 0: the first parent's width)")
    if n_checkpoints < 2 and not (one_allowed and width):
        more = ", or one and --width W to compress or widen it" if one_allowed else ""
        raise OtfuseError(f"give two or more checkpoints{more}; got {n_checkpoints}")
    resolve(FuseConfig, given or {}, config).check(n_checkpoints)


def recipe_options(metas: list[dict]) -> dict[str, object]:
    """Fusion defaults that follow from how the parents were trained, each chosen on a validation split
    (docs/measurements.md, "Fusion at scale"). Parents that fit their augmented training set (long-trained, e.g.
    50 epochs at width 64) saw only augmented images: their BatchNorm statistics are those of crops
    and flips, so the averaged model's are recomputed on such images too; only where the dataset has
    augmentation at all (digits never does, whatever the recipe said). Many classes need more images for the
    refit to fit the head: REFIT_IMAGES_PER_CLASS images of each class, at least the default 1,000 (ten classes keep
    1,000; CIFAR-100's parents get 4,000, docs/defaults.md). Explicit options win."""
    out: dict[str, object] = {"bn_augment": True} if metas and all(fits_training_set(m) for m in metas) else {}
    per_class = REFIT_IMAGES_PER_CLASS * max((int(m.get("num_classes", 0)) for m in metas), default=0)
    if per_class > RefitConfig.n_images:
        out["refit_n_images"] = per_class
    return out


def fusion_options(given: dict[str, Any], config: str = "", metas: list[dict] | None = None) -> FuseConfig:
    """The fusion options: FuseConfig's defaults, then those the parents' training recipe implies (given their
    `metas`), then the JSON file `config`, then the options `given` on the command line."""
    return resolve(FuseConfig, given, config, recipe_options(metas or []))


def fusion_inputs(
    paths: list[str | Path],
    given: dict[str, Any] | None = None,
    config: str = "",
    width: int = 0,
    data_dir: str | Path | None = None,
    device: str = "auto",
    same_width: bool = False,
) -> FusionInputs:
    """Load and check the parents and their data, resolve the fusion options once, and build the target."""
    models, metas, data = load_parents(paths, data_dir, device, same_width=same_width)
    cfg = fusion_options(given or {}, config, metas)
    cfg.check(len(models))
    width = width or metas[0]["width"]
    target = target_model(metas[0], width, next(models[0].parameters()).device)
    parts = [parts_of(m) for m in metas]
    counts = torch.stack([torch.bincount(data.train_y[union_mask(data.train_y, [p])].cpu(), minlength=data.num_classes) for p in parts])
    seen = union_mask(data.val_y, parts, 1, data.train_y)
    public = public_dataset(cfg.fusion_data)
    if public:  # images no party trained on, labels unknown (-1)
        x = public_images(public, data, data_dir)
        data = replace(data, train_x=x, train_y=torch.full((len(x),), -1, dtype=torch.int64, device=x.device))
    keep = torch.ones_like(data.train_y, dtype=torch.bool) if public else fusion_mask(data.train_y, parts, cfg.fusion_data)
    if not bool(keep.all() and seen.all()):  # validation too: only what the parties held
        data = replace(data, train_x=data.train_x[keep], train_y=data.train_y[keep], val_x=data.val_x[seen], val_y=data.val_y[seen])
    return FusionInputs(models, metas, [str(p) for p in paths], data, cfg, width, target, parts, counts)


def public_images(name: str, like: ImageData, data_dir: str | Path | None) -> torch.Tensor:
    """The training images of dataset `name`, as `like`'s channels and size, on its device: a public set for a fuser
    that holds none of the parties' data. The parties' own dataset is refused: that is `union`."""
    public = load_dataset(name, data_dir)
    if public.digest and public.digest == like.digest:
        raise OtfuseError(f"--fusion-data public:{name} is the parents' own dataset; give --fusion-data union for that")
    return converted(public.train_x, like.in_channels, tuple(like.train_x.shape[-2:])).to(like.train_x.device)


def target_model(meta: dict, width: int, device: torch.device) -> nn.Module:
    """A fresh model of the architecture in checkpoint metadata `meta`, `width` wide, on `device`."""
    return model_from_meta(meta, width).to(device)
