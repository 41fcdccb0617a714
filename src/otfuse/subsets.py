"""Parts of a dataset that one party trains on: a class subset, a sample biased towards some classes, or party i of
K under a partition of every class's images (iid, disjoint class blocks, or Dirichlet label skew).

    part = Subset(classes=parse_classes("0-49", 100), bias=1.0)    # classes 0-49 only (disjoint parties)
    part = Subset(classes=parse_classes("0-4", 10), bias=0.8)       # 80% of those classes' images, 20% of the others'
    part = Partition("dirichlet", parties=4, party=1, alpha=0.5)    # party 1 of 4, label skew Dirichlet(0.5)
    data = restrict(load_dataset("cifar10"), part)                 # train and validation splits follow the part
    complement(part, 10)                                            # the other party: exactly the images `part` leaves

A Dirichlet partition follows Flower Datasets' DirichletPartitioner (its defaults: self-balancing, a minimum
partition size of 10): for each class in turn, shares over the K parties are drawn from Dirichlet(alpha); a party
that already holds more than N/K images gets no share of the classes that follow (the others renormalised); the
class's images are cut at floor(cumulative share x count); the whole draw is repeated (at most 10 times) until every
party holds at least `min_size` training images. The validation split is cut by the same shares. All K parties
of one (kind, K, alpha, min_size, seed) split every split exactly.

Which images of a class a part draws is fixed by its `seed`: each class's images are ranked by a random
order drawn from the seed, the listed classes take the first `bias` share of their ranks and the other
classes the last `1 - bias`. Two parties with complementary classes, one bias and one seed therefore split
every split (train, validation) exactly: nothing shared, nothing left over. The model's head always covers
every class of the dataset; a checkpoint records its part in its metadata (`subset`). A model made from parties
(fused, or fine-tuned from a fused one) records the union of their parts (`parts`): whatever later reads data for it
(a fusion, a fine-tune) reads only that union, never images no party held.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from otfuse.data import ImageData
from otfuse.errors import OtfuseError


@dataclass(frozen=True)
class Subset:
    classes: tuple[int, ...]  # the listed classes' label indices, sorted
    bias: float = 1.0  # share of the listed classes' images drawn; the other classes give 1 - bias of theirs
    seed: int = 0  # fixes which images are drawn: parties with one seed and complementary classes split the data exactly

    def to_meta(self) -> dict:
        return {"classes": list(self.classes), "bias": self.bias, "seed": self.seed}

    @property
    def tag(self) -> str:
        """A file-name-safe name: `c0-49`, `c0-4-b0.8`."""
        return f"c{format_classes(self.classes)}" + ("" if self.bias == 1.0 else f"-b{self.bias:g}")

    def classes_of(self, num_classes: int) -> tuple[int, ...]:
        """The classes it lists (a part's task)."""
        return self.classes

    def mask(self, y: torch.Tensor, salt: int, train_y: torch.Tensor | None = None) -> torch.Tensor:
        """Which images with labels `y` (a split: `salt` 0 train, 1 validation) it draws; `train_y` is not needed."""
        listed = torch.zeros(int(y.max()) + 1 if len(y) else 1, dtype=torch.bool)
        listed[[c for c in self.classes if c < len(listed)]] = True
        rank = _ranks(y, self.seed, salt)
        take = torch.where(listed[y.cpu()], rank < self.bias - 1e-12, rank >= self.bias - 1e-12)
        return take.to(y.device)


def parse_classes(text: str, num_classes: int) -> tuple[int, ...]:
    """'0-49' or '0,3,5-9' -> sorted label indices, each below `num_classes`; one clear error otherwise."""
    out: set[int] = set()
    for item in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise OtfuseError(f"--classes {text!r}: write label indices and ranges, e.g. 0-49 or 0,3,5-9")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= num_classes:
            raise OtfuseError(f"--classes {text!r}: {item} is not a range within the dataset's labels 0-{num_classes - 1}")
        out.update(range(lo, hi + 1))
    if len(out) == num_classes:
        raise OtfuseError(f"--classes {text!r} lists every class; leave --classes out to train on the whole dataset")
    return tuple(sorted(out))


def format_classes(classes: tuple[int, ...] | list[int]) -> str:
    """(0, 1, 2, 5) -> '0-2,5': the shortest ranges."""
    runs: list[list[int]] = []
    for c in sorted(classes):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


PARTITIONS = ("iid", "classes", "dirichlet")
MAX_PARTIES = 1000


@dataclass(frozen=True)
class Partition:
    """Party `party` (1 to `parties`) of a partition of every class's images: `iid` (each class cut evenly), `classes`
    (disjoint blocks of classes, one per party) or `dirichlet` (label skew, module docstring)."""

    kind: str
    parties: int
    party: int
    alpha: float = 0.5  # dirichlet: the concentration; small: each party holds few classes
    min_size: int = 10  # dirichlet: training images every party holds at least (Flower's min_partition_size)
    seed: int = 0

    def to_meta(self) -> dict:
        return {
            "partition": self.kind,
            "parties": self.parties,
            "party": self.party,
            "alpha": self.alpha,
            "min_size": self.min_size,
            "seed": self.seed,
        }

    @property
    def tag(self) -> str:
        """A file-name-safe name: `iid4-p1`, `classes4-p2`, `dirichlet4-a0.5-p3`."""
        return f"{self.kind}{self.parties}" + (f"-a{self.alpha:g}" if self.kind == "dirichlet" else "") + f"-p{self.party}"

    def classes_of(self, num_classes: int) -> tuple[int, ...]:
        """The classes it holds images of by construction (iid and dirichlet: every class may be drawn)."""
        if self.kind != "classes":
            return tuple(range(num_classes))
        return tuple(c for c in range(num_classes) if c * self.parties // num_classes == self.party - 1)

    def bounds(self, train_y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """[classes, parties + 1] cumulative shares of each class's images, cut from the train split's counts."""
        counts = torch.bincount(train_y.cpu(), minlength=num_classes).tolist()
        k = self.parties
        if self.kind == "iid":
            return torch.linspace(0, 1, k + 1, dtype=torch.float64).expand(num_classes, k + 1).clone()
        if self.kind == "classes":
            owner = torch.tensor([c * k // num_classes for c in range(num_classes)])
            return (torch.arange(k + 1)[None, :] > owner[:, None]).double()
        return _dirichlet_bounds(counts, k, self.alpha, self.min_size, self.seed)

    def mask(self, y: torch.Tensor, salt: int, train_y: torch.Tensor | None = None) -> torch.Tensor:
        """Which images with labels `y` (a split: `salt` 0 train, 1 validation) the party holds; the shares are cut
        from the train split's labels `train_y` (default `y`)."""
        num_classes = int(max(y.max() if len(y) else 0, train_y.max() if train_y is not None and len(train_y) else 0)) + 1
        cum = self.bounds(y if train_y is None else train_y, num_classes)
        position, count = _positions(y, self.seed, salt)
        yc = y.cpu()
        lo = torch.floor(cum[yc, self.party - 1] * count + 1e-9)
        hi = torch.where(cum[yc, self.party] >= 1.0, count.double(), torch.floor(cum[yc, self.party] * count + 1e-9))
        return ((position >= lo) & (position < hi)).to(y.device)


def _dirichlet_bounds(counts: list[int], parties: int, alpha: float, min_size: int, seed: int) -> torch.Tensor:
    """Flower Datasets' DirichletPartitioner on per-class `counts` (module docstring): [classes, parties + 1]."""
    rng = np.random.default_rng(seed)
    average = sum(counts) / parties
    for _ in range(11):  # the first draw and at most 10 more, as Flower's
        held = np.zeros(parties)
        cum = np.zeros((len(counts), parties + 1))
        for c, n in enumerate(counts):
            share = rng.dirichlet(np.full(parties, alpha))
            share[held > average] = 0.0  # self-balancing: a party above the average takes no more
            if not share.sum() > 0:  # every remaining share underflowed (alpha near 0): an even cut among the rest
                share = (held <= average).astype(float)
            share = share / share.sum()
            cum[c, 1:] = np.cumsum(share)
            cum[c, -1] = 1.0
            held += np.diff(np.floor(cum[c] * n + 1e-9).clip(max=n))
        if held.min() >= min_size:
            return torch.from_numpy(cum)
    raise OtfuseError(
        f"--partition dirichlet --alpha {alpha:g} over {parties} parties leaves a party with fewer than --min-size "
        f"{min_size} training images after 11 draws; raise --alpha or lower --min-size or --parties"
    )


AnyPart = Subset | Partition


def subset_of(meta: dict) -> AnyPart | None:
    """The part of its data a checkpoint was trained on (None: all of it)."""
    s = meta.get("subset")
    return None if not s else part_from_record(s)


def part_from_record(s: dict) -> AnyPart:
    if "partition" in s:
        return Partition(str(s["partition"]), int(s["parties"]), int(s["party"]), float(s["alpha"]), int(s["min_size"]), int(s["seed"]))
    return Subset(tuple(s["classes"]), float(s["bias"]), int(s["seed"]))


Parts = tuple[AnyPart, ...]  # a union of parts: the images any of them draws


def parts_of(meta: dict) -> Parts | None:
    """The images a checkpoint's model may have learnt from, as a union of parts (None: all the data): a party's
    own part, or the union its parties held for a model made from them (`parts`; `parent_subsets` before that)."""
    if meta.get("subset"):
        return (part_from_record(meta["subset"]),)
    if isinstance(meta.get("parts"), list):
        return tuple(part_from_record(s) for s in meta["parts"])
    legacy = meta.get("parent_subsets")
    if isinstance(legacy, list) and legacy and all(legacy):
        return tuple(part_from_record(s) for s in legacy)
    return None


def union_of(parts: list[Parts | None]) -> Parts | None:
    """The union of several models' parts (None as soon as one learnt from all the data), each part once."""
    if any(p is None for p in parts):
        return None
    return tuple(dict.fromkeys(s for p in parts for s in p))


def classes_of(parts: Parts | None, num_classes: int) -> tuple[int, ...]:
    """The classes the parts list (every class for all the data, or for an iid or Dirichlet party)."""
    if parts is None:
        return tuple(range(num_classes))
    return tuple(sorted({c for s in parts for c in s.classes_of(num_classes)}))


def complement(part: Subset, num_classes: int) -> Subset:
    """The other party of a two-party split: the unlisted classes, the same bias and seed."""
    return replace(part, classes=tuple(c for c in range(num_classes) if c not in part.classes))


def _positions(y: torch.Tensor, seed: int, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's position among its class's images in a random order drawn from (seed, salt), and its class's count."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + salt)
    keys = torch.rand(len(y), generator=g)
    order = torch.argsort(keys)
    order = order[torch.argsort(y.cpu()[order], stable=True)]  # by class, the random order within each class
    sorted_y = y.cpu()[order]
    counts = torch.bincount(sorted_y, minlength=int(y.max()) + 1 if len(y) else 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty(len(y), dtype=torch.int64)
    position[order] = torch.arange(len(y)) - starts[sorted_y]
    return position, counts[y.cpu()]


def _ranks(y: torch.Tensor, seed: int, salt: int) -> torch.Tensor:
    """Each image's rank among its class's images, in a random order drawn from (seed, salt), as a share in [0, 1)."""
    position, count = _positions(y, seed, salt)
    return position.double() / count.double()


def mask(y: torch.Tensor, part: AnyPart, salt: int, train_y: torch.Tensor | None = None) -> torch.Tensor:
    """Which of the images with labels `y` the part draws (`salt` tells the splits apart: 0 train, 1 validation; a
    partition cuts its shares from the train split's labels `train_y`, default `y`)."""
    return part.mask(y, salt, train_y)


def restrict(data: ImageData, parts: Subset | Parts | None) -> ImageData:
    """`data` with its train and validation splits restricted to what `parts` (one part or a union) draw (the test
    split stays whole: the joint accuracy is over every class)."""
    if parts is None:
        return data
    parts = (parts,) if isinstance(parts, (Subset, Partition)) else parts
    keep_train, keep_val = union_mask(data.train_y, [parts], 0), union_mask(data.val_y, [parts], 1, data.train_y)
    return replace(
        data, train_x=data.train_x[keep_train], train_y=data.train_y[keep_train], val_x=data.val_x[keep_val], val_y=data.val_y[keep_val]
    )


def union_mask(y: torch.Tensor, parts: list[AnyPart | Parts | None], salt: int = 0, train_y: torch.Tensor | None = None) -> torch.Tensor:
    """The images any of the parts (each one part or a union) drew (every image where one is the whole dataset);
    `train_y`: the train split's labels, which a partition cuts its shares from (default `y`)."""
    union = union_of([(p,) if isinstance(p, (Subset, Partition)) else p for p in parts])
    if union is None:
        return torch.ones(len(y), dtype=torch.bool, device=y.device)
    out = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for p in union:
        out |= mask(y, p, salt, train_y)
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_partition_record(v: dict, num_classes: int) -> bool:
    """A partition's record: a kind, K parties, party 1 to K, a finite positive alpha, a minimum size, a 32-bit seed."""
    return (
        set(v) == {"partition", "parties", "party", "alpha", "min_size", "seed"}
        and v["partition"] in PARTITIONS
        and _is_int(v["parties"])
        and 2 <= v["parties"] <= MAX_PARTIES
        and (v["partition"] != "classes" or v["parties"] <= num_classes)
        and _is_int(v["party"])
        and 1 <= v["party"] <= v["parties"]
        and isinstance(v["alpha"], (int, float))
        and not isinstance(v["alpha"], bool)
        and math.isfinite(v["alpha"])
        and 0 < v["alpha"] <= 1e6
        and _is_int(v["min_size"])
        and 0 <= v["min_size"] < 2**31
        and _is_int(v["seed"])
        and 0 <= v["seed"] < 2**32
    )


def is_part_record(v: object, num_classes: int) -> bool:
    """A `subset` record: listed classes (distinct label indices), a bias in (0, 1], an integer seed; or a partition's."""
    if isinstance(v, dict) and "partition" in v:
        return _is_partition_record(v, num_classes)
    if not isinstance(v, dict) or set(v) != {"classes", "bias", "seed"}:
        return False
    classes, bias, seed = v["classes"], v["bias"], v["seed"]
    return (
        isinstance(classes, list)
        and 0 < len(classes) < num_classes
        and len(set(classes)) == len(classes)
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes for c in classes)
        and isinstance(bias, (int, float))
        and not isinstance(bias, bool)
        and math.isfinite(bias)
        and 0 < bias <= 1
        and isinstance(seed, int)
        and not isinstance(seed, bool)
        and 0 <= seed < 2**32
    )


def is_parts_record(v: object, num_classes: int) -> bool:
    """A `parts` record: a non-empty list of part records."""
    return isinstance(v, list) and 0 < len(v) <= 100_000 and all(is_part_record(s, num_classes) for s in v)


def per_class(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """A mask of at most `n` images of each class of `y`, drawn by `seed`."""
    rank = _ranks(y, seed, 2)
    counts = torch.bincount(y.cpu()).double()
    return (rank * counts[y.cpu()] < n).to(y.device)


def check_bias(bias: float) -> None:
    if not (math.isfinite(bias) and 0 < bias <= 1):
        raise OtfuseError(f"--bias {bias} must be above 0 and at most 1 (the listed classes' share of their images; 1: those classes only)")


# counts below 10^9; public:<dataset>: images of a dataset no party trained on (as FedDF's server holds)
FUSION_DATA = re.compile(r"^(?:union|model(?P<k>[1-9]\d{0,5})|(?P<n>[1-9]\d{0,8})-per-class|public:(?P<public>.+))$")


def check_fusion_data(spec: str, n_models: int | None = None) -> None:
    """`union`, `model<k>` or `<N>-per-class`; one clear error otherwise."""
    m = FUSION_DATA.match(spec)
    if not m:
        raise OtfuseError(
            f"--fusion-data {spec!r}: give union (what the parents trained on together), model<k> (the k-th "
            "parent's own images, e.g. model1), <N>-per-class (e.g. 10-per-class) or public:<dataset> (a dataset no "
            "party trained on, e.g. public:cifar100)"
        )
    if m.group("k") and n_models is not None and int(m.group("k")) > n_models:
        raise OtfuseError(f"--fusion-data {spec}: there are {n_models} parents; give model1 to model{n_models}")


def public_dataset(spec: str) -> str | None:
    """The dataset of `--fusion-data public:<dataset>`, or None for the parents' own data."""
    m = FUSION_DATA.match(spec)
    return m.group("public") if m else None


def fusion_mask(y: torch.Tensor, parts: list[AnyPart | Parts | None], spec: str = "union") -> torch.Tensor:
    """The training images a fusion may read: the union of the parents' parts (`union`), the k-th parent's part
    (`model<k>`: a fuser holding only its own data), or N images of each class of the union (`<N>-per-class`)."""
    check_fusion_data(spec, len(parts))
    m = FUSION_DATA.match(spec)
    if m.group("public"):
        raise OtfuseError(f"--fusion-data {spec}: a public dataset is not a part of the parents' data (fusion_inputs reads it)")
    if m.group("k"):
        part = parts[int(m.group("k")) - 1]
        return union_mask(y, [part])
    keep = union_mask(y, parts)
    if m.group("n"):
        keep &= per_class(y, int(m.group("n")))
    return keep
