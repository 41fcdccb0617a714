"""Datasets by name, decoded once into cached uint8 tensors, and batches augmented as tensors.

    data = load_dataset("digits", data_dir="~/.cache/otfuse")       # embedded, no download
    data = load_dataset("imagefolder:../shared/data/cifar10-jpeg.tar.xz")
    for x, y in batches(data.train_x, data.train_y, 256, data.norm, augment=data.augment, seed=0, epoch=0):
        ...

Names: `cifar10` (torchvision's pickles in the data dir, or a download), `cifar100` (a local copy
first: `cifar100:PATH` names one, an ImageFolder archive or folder such as the lossless PNG copy or
torchvision's `cifar-100-python` folder; else torchvision's pickles or `cifar100-png.tar.xz` in the
data dir; else a download), `fashion-mnist` (torchvision's files, or Debian's `dataset-fashion-mnist`),
`digits` (scikit-learn's bundled 8x8 digits) and `imagefolder:PATH` (PATH/train/<class>/*,
PATH/test/<class>/*, or a .tar.xz of that layout).

Every decoded dataset carries a digest of its arrays; data whose digest is known (`KNOWN_CONTENT`)
is called by its own name in tables and file names (`ImageData.slug`), whatever path it came from:
the lossless CIFAR-100 copy loaded as `imagefolder:...` is `cifar100`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.metadata
import io
import lzma
import os
import pickle
import tarfile
import unicodedata
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from otfuse.errors import OtfuseError
from otfuse.storage import atomic_write_bytes, load_torch, regular_file, save_torch, writable_dir

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CACHE_VERSION = 1
MAX_FILE_BYTES = 64 << 20  # the largest file an image folder may hold: no image otfuse can train on is larger
MAX_PIXELS = 4096 * 4096  # the largest image side a checkpoint may record is 4096
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a camera was held
OFFLINE_CHOICES = (
    "offline choices: --dataset digits (bundled), fashion-mnist (apt-get install dataset-fashion-mnist), "
    "cifar100:PATH (a local copy, e.g. the lossless PNG archive), or imagefolder:PATH (e.g. the CIFAR-10 JPEG copy, a .tar.xz)"
)
# CIFAR-100's fine labels in its label order, which is also their sorted (ImageFolder) order
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish "
    "forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle "
    "mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine "
    "possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar "
    "sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree "
    "wolf woman worm"
).split()
CIFAR100_ARCHIVE = "cifar100-png.tar.xz"  # the lossless copy's file name, looked for in the data dir
# decoded datasets known by content (ImageData.digest), by the name tables give them: the lossless CIFAR-100 copy
# (../shared/data/cifar100-png.tar.xz) holds the official pixels and split, in class order
KNOWN_CONTENT = {"9ed31c26beb229a27a8daa69175ba9ea": "cifar100"}


def default_data_dir() -> Path:
    return Path(os.environ.get("OTFUSE_DATA_DIR", Path.home() / ".cache" / "otfuse"))


@dataclass
class ImageData:
    """A dataset as uint8 NCHW tensors: train (validation held out), val and test splits."""

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop + flip suit natural images, not digits
    digest: str = ""  # of the decoded arrays (content_digest): what the data is, whatever its name or path

    @property
    def slug(self) -> str:
        """The name tables and file names give this data: its known name where its content is known, else dataset_slug."""
        return KNOWN_CONTENT.get(self.digest, dataset_slug(self.name))

    @property
    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        if which not in ("train", "val", "test"):
            raise OtfuseError(f"unknown split {which!r}; use train, val or test")
        if not len(getattr(self, f"{which}_y")):
            raise OtfuseError(
                f"{self.name} has no {which} images (a model trained with --val-size 0 holds out no validation "
                "split); use another split, or train with a validation split"
            )
        return getattr(self, f"{which}_x"), getattr(self, f"{which}_y")

    def to(self, device: torch.device | str) -> ImageData:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return ImageData(**moved)


def dataset_slug(name: str) -> str:
    """A folder-safe name: `imagefolder:/x/cifar10-jpeg.tar.xz` -> `imagefolder-cifar10-jpeg`; `cifar100:PATH` ->
    `cifar100` (a local copy of a known dataset is that dataset)."""
    if name.startswith("imagefolder:"):
        stem = Path(name.split(":", 1)[1].rstrip("/")).name
        for ext in (".tar.xz", ".tar.gz", ".tar"):
            stem = stem.removesuffix(ext)
        return f"imagefolder-{stem}"
    return name.partition(":")[0]


def resolved_name(name: str) -> str:
    """`name` with the path of a local copy made absolute (`imagefolder:../x` -> `imagefolder:/abs/x`): what a
    checkpoint records, so it reads the same data from any folder."""
    kind, sep, arg = name.partition(":")
    if not sep or not arg or kind not in ("imagefolder", "cifar100"):
        return name
    return f"{kind}:{Path(arg).expanduser().resolve()}"


def content_digest(raw: dict) -> str:
    """A digest of a decoded dataset's arrays and class names: equal digests, equal data."""
    h = hashlib.blake2b(digest_size=16)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        t = raw[k].contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    h.update("\n".join(raw["classes"]).encode())
    return h.hexdigest()


def load_dataset(name: str, data_dir: str | Path | None = None, val_size: int | None = None, val_seed: int = 0) -> ImageData:
    """Load `name` from the cache in `data_dir`, decoding its source once on first use."""
    data_dir = writable_dir(data_dir or default_data_dir())
    source = _source(name, data_dir)
    raw = _cached(source, data_dir)
    source.check(raw)
    if val_size is None:
        val_size = min(5000, len(raw["train_y"]) // 10)
    return _with_validation(name, raw, val_size, val_seed)


# --- sources ---------------------------------------------------------------------------------


@dataclass
class _Source:
    key: str  # names the source and its files' sizes and mtimes: a changed source misses the cache
    decode: Callable[[], dict]
    check: Callable[[dict], None] = lambda raw: None  # what a dataset of this name must hold, decoded or cached


SourceFn = Callable[[str, Path], _Source]
SOURCES: dict[str, SourceFn] = {}
AUGMENTS: dict[str, bool] = {}  # whether training augments the dataset's images (crops and flips suit natural images)


def register_dataset(name: str, augment: bool = True):
    """Add a dataset: `@register_dataset("name")` on a function (argument after "name:", data dir) -> _Source;
    `augment=False` for images that crops and flips would damage (digits)."""

    def wrap(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        AUGMENTS[name] = augment
        return fn

    return wrap


def dataset_augments(name: str) -> bool:
    """Whether training on dataset `name` augments its images (False for a name otfuse does not know)."""
    return AUGMENTS.get(name.partition(":")[0], False)


def _source(name: str, data_dir: Path) -> _Source:
    kind, _, arg = name.partition(":")
    if kind not in SOURCES:
        raise OtfuseError(
            f"unknown dataset {name!r}; choose "
            + ", ".join(k + {"imagefolder": ":PATH", "cifar100": "[:PATH]"}.get(k, "") for k in SOURCES)
        )
    return SOURCES[kind](arg, data_dir)


def _fingerprint(paths: list[Path]) -> str:
    """A cache key of the files' identity and state: a file replaced by another of the same size, its time of
    modification copied over, still changes its inode or change time (which no user can set back)."""
    h = hashlib.sha1()
    for p in sorted(paths):
        st = p.stat()
        h.update(os.fsencode(f"{p}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns};"))
    return h.hexdigest()[:16]


@register_dataset("cifar10")
def _cifar10_source(_arg: str, data_dir: Path) -> _Source:
    return _cifar_source("cifar10", data_dir)


@register_dataset("cifar100")
def _cifar100_source(arg: str, data_dir: Path) -> _Source:
    """A local copy first: the one named (`cifar100:PATH`), else torchvision's pickles or the lossless PNG archive in
    the data dir; a download only when there is none."""
    if arg:
        path = Path(arg).expanduser()
        if not path.exists():
            raise OtfuseError(
                f"cifar100 copy {path} does not exist; give the PNG archive (e.g. ../shared/data/{CIFAR100_ARCHIVE}), "
                "an ImageFolder folder of it, or torchvision's cifar-100-python folder"
            )
        if path.is_dir() and _has_cifar_pickles("cifar100", path):
            return _cifar_source("cifar100", path.parent, path)
        return _cifar100_imagefolder(path)
    if not _has_cifar_pickles("cifar100", data_dir / CIFAR["cifar100"][0]) and (data_dir / CIFAR100_ARCHIVE).is_file():
        return _cifar100_imagefolder(data_dir / CIFAR100_ARCHIVE)
    return _cifar_source("cifar100", data_dir)


def _cifar100_imagefolder(path: Path) -> _Source:
    """CIFAR-100 in the ImageFolder layout: the images as they are (one cache with `imagefolder:PATH`), its 100 fine
    labels checked."""

    def check(raw: dict) -> None:
        if raw["classes"] != CIFAR100_CLASSES:
            odd = sorted(set(raw["classes"]) ^ set(CIFAR100_CLASSES))
            raise OtfuseError(
                f"{path} holds {len(raw['classes'])} classes, not CIFAR-100's 100 fine labels ({', '.join(odd[:3])} "
                f"differ); give a copy of CIFAR-100, or use --dataset imagefolder:{path}"
            )

    inner = _imagefolder_source(str(path), path)
    return _Source(inner.key, inner.decode, check)


class _ArrayUnpickler(pickle.Unpickler):
    """Reads what CIFAR's batch files hold (dicts, lists, strings, numbers and numpy arrays) and nothing else: a
    file planted in the data dir that names any other class or function (which plain pickle would call) is refused."""

    ALLOWED = {(f"numpy{core}.multiarray", fn) for core in (".core", "._core") for fn in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def __init__(self, fh, path: Path):
        super().__init__(fh, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise OtfuseError(
                f"{self.path} asks to run {module}.{name}, which CIFAR's files never do; it was not loaded "
                "(delete the data dir's CIFAR folder so it is fetched again)"
            )
        return super().find_class(module, name)


# per dataset: torchvision's folder, its data files (the last one the test split), label key, meta file, class-name key
CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels", "meta", "fine_label_names"),
}


def _has_cifar_pickles(name: str, folder: Path) -> bool:
    _, files, _, meta_file, _ = CIFAR[name]
    return all((folder / f).is_file() for f in files + [meta_file])


def _cifar_source(name: str, data_dir: Path, root: Path | None = None) -> _Source:
    folder, files, label_key, meta_file, meta_key = CIFAR[name]
    root = root or data_dir / folder
    if not _has_cifar_pickles(name, root):
        _download_cifar(name, data_dir)
    paths = [root / f for f in files + [meta_file]]
    # CIFAR-100 sorted by class (stably), as its lossless PNG copy holds it: the same arrays, so the same validation split
    by_class = name == "cifar100"

    def decode() -> dict:
        def read(f: str) -> dict:
            with open(root / f, "rb") as fh:
                out = _ArrayUnpickler(fh, root / f).load()
            if not isinstance(out, dict):
                raise OtfuseError(
                    f"{root / f} is not one of CIFAR's batch files (a {type(out).__name__}); delete it so it is fetched again"
                )
            return out

        parts = [read(f) for f in files]
        to_x = lambda d: torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        to_y = lambda d: torch.tensor(d[label_key], dtype=torch.int64)
        splits = [(torch.cat([to_x(d) for d in parts[:-1]]), torch.cat([to_y(d) for d in parts[:-1]])), (to_x(parts[-1]), to_y(parts[-1]))]
        if by_class:
            splits = [(x[order], y[order]) for x, y in splits for order in [torch.argsort(y, stable=True)]]
        (tx, ty), (vx, vy) = splits
        return dict(train_x=tx, train_y=ty, test_x=vx, test_y=vy, classes=list(read(meta_file)[meta_key]), augment=True)

    return _Source(f"{name}{'-by-class' if by_class else ''}-{_fingerprint(paths)}", decode)


def _download_cifar(name: str, data_dir: Path) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(root=str(data_dir), train=True, download=True)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "no internet here"
        raise OtfuseError(f"cannot download {name} into {data_dir} ({type(exc).__name__}); {OFFLINE_CHOICES}") from None


@register_dataset("fashion-mnist")
def _fashion_source(_arg: str, data_dir: Path) -> _Source:
    raw = data_dir / "FashionMNIST" / "raw"
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    if not all((raw / n).is_file() for n in names):
        _fetch_fashion(raw, names, data_dir)
    paths = [raw / n for n in names]

    def decode() -> dict:
        tx, ty, vx, vy = (_read_idx(p) for p in paths)
        classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
        return dict(train_x=tx[:, None], train_y=ty.long(), test_x=vx[:, None], test_y=vy.long(), classes=classes, augment=True)

    return _Source(f"fashion-mnist-{_fingerprint(paths)}", decode)


def _fetch_fashion(raw: Path, names: list[str], data_dir: Path) -> None:
    """Decompress Debian's copy into the data dir (its .gz files fail torchvision's checksums), else download."""
    system = Path(os.environ.get("OTFUSE_FASHION_MNIST_DIR", DEBIAN_FASHION_MNIST))
    if all((system / f"{n}.gz").is_file() for n in names):
        raw.mkdir(parents=True, exist_ok=True)
        for n in names:
            with gzip.open(system / f"{n}.gz", "rb") as f:
                atomic_write_bytes(raw / n, f.read())
        return
    import torchvision

    try:
        torchvision.datasets.FashionMNIST(root=str(data_dir), train=True, download=True)
    except Exception as exc:
        raise OtfuseError(
            f"fashion-mnist is not in {system} and cannot be downloaded ({type(exc).__name__}); "
            f"apt-get install -y dataset-fashion-mnist, or {OFFLINE_CHOICES}"
        ) from None


def _read_idx(path: Path) -> torch.Tensor:
    """The IDX format of (Fashion-)MNIST: a 4-byte magic whose last byte is the rank, big-endian dims, uint8 data."""
    data = path.read_bytes()
    rank = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=rank, offset=4)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims).copy())


@register_dataset("digits", augment=False)
def _digits_source(_arg: str, _data_dir: Path) -> _Source:
    # the version from the package's metadata: importing scikit-learn takes about 2 s, and a cached copy needs none of it
    try:
        version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        raise OtfuseError("the digits dataset comes with scikit-learn, which is not installed: pip install scikit-learn") from None
    return _Source(f"digits-sklearn{version}", _decode_digits)


def _decode_digits() -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    tx, vx, ty, vy = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    return dict(
        train_x=torch.from_numpy(tx),
        train_y=torch.from_numpy(ty).long(),
        test_x=torch.from_numpy(vx),
        test_y=torch.from_numpy(vy).long(),
        classes=[str(i) for i in range(10)],
        augment=dataset_augments("digits"),
    )


@register_dataset("imagefolder")
def _imagefolder_source(arg: str, _data_dir: Path) -> _Source:
    if not arg:
        raise OtfuseError("--dataset imagefolder needs a path: imagefolder:PATH (a folder with train/ and test/, or a .tar.xz of one)")
    path = Path(arg).expanduser()
    if not path.exists() and not path.is_symlink():
        raise OtfuseError(f"imagefolder path {path} does not exist; give a folder with train/ and test/ or a .tar.xz of one")
    if not path.is_dir():
        regular_file(path, "imagefolder archive")
    try:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        key = _fingerprint(files)
    except OSError as exc:  # an entry that cannot even be looked at: the walk below would stop on it too
        raise OtfuseError(
            f"imagefolder {path}: {exc.filename} cannot be read ({exc.strerror}); fix its permissions or move it away"
        ) from None
    return _Source(f"imagefolder-{key}", lambda: _decode_imagefolder(path))


def _decode_imagefolder(path: Path) -> dict:
    """Decode every image of `split/class/file` (`split`: train or test; one common top folder, as many archives
    have, is allowed above them). Hidden files and folders (.DS_Store, .ipynb_checkpoints/) and files outside
    train/ and test/ (a README) are skipped; a file at any other depth, a symbolic link, or a file that is not
    a decodable image is named in one clear error."""
    entries = list(_tar_entries(path) if path.is_file() else _dir_entries(path))
    top = {parts[0] for parts, _ in entries if parts}
    if len(top) == 1 and not top & {"train", "test"}:  # one folder above train/ and test/
        entries = [(parts[1:], read) for parts, read in entries]
    splits: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    for parts, read in entries:
        if not parts or any(p.startswith(".") for p in parts) or parts[0] not in splits:
            continue
        if len(parts) != 3:
            where = "directly in" if len(parts) == 2 else "below a class folder of"
            raise OtfuseError(
                f"imagefolder {path}: {'/'.join(parts)} lies {where} {parts[0]}/; the layout is exactly "
                f"{parts[0]}/<class>/<image>: move or remove it"
            )
        splits[parts[0]].setdefault(parts[1], []).append(("/".join(parts), read()))
    classes = sorted(splits["train"])
    same = [c for c in classes if unicodedata.normalize("NFC", c) != c and unicodedata.normalize("NFC", c) in classes]
    if same:
        raise OtfuseError(
            f"imagefolder {path}: the classes {unicodedata.normalize('NFC', same[0])!r} and {same[0]!r} look the same but are "
            "written in two Unicode forms (NFC and NFD); merge the two folders into one"
        )
    if not classes or sorted(splits["test"]) != classes:
        missing = sorted(set(splits["train"]) ^ set(splits["test"]))
        raise OtfuseError(
            f"imagefolder {path} needs train/<class>/* and test/<class>/* with the same classes"
            + (f" (only in one of them: {', '.join(missing[:5])})" if missing and classes else "")
        )

    def decode(name: str, blob: bytes) -> np.ndarray:
        try:
            with warnings.catch_warnings(), Image.open(io.BytesIO(blob)) as im:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here, in one line
                if im.width * im.height > MAX_PIXELS:
                    raise OtfuseError(
                        f"imagefolder {path}: {name} is {im.width} x {im.height} pixels, more than otfuse reads "
                        f"({MAX_PIXELS // 2**20} megapixels); resize it first"
                    )
                if im.mode not in EIGHT_BIT_MODES:
                    raise OtfuseError(
                        f"imagefolder {path}: {name} holds {im.mode} pixels, not 8-bit ones (a 16-bit or float image "
                        "would read as white); convert it to 8-bit first"
                    )
                upright = ImageOps.exif_transpose(im) if im.getexif().get(EXIF_ORIENTATION, 1) != 1 else im  # as viewers show it
                return np.asarray(upright.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise OtfuseError(
                f"imagefolder {path}: {name} is not a readable image ({' '.join(str(exc).split()[:8])}); remove or replace it"
            ) from None

    def stack(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for label, c in enumerate(classes):
            for name, blob in splits[split][c]:
                xs.append(decode(name, blob))
                ys.append(label)
        if len({x.shape for x in xs}) != 1:
            raise OtfuseError(f"imagefolder {path} holds images of different sizes; resize them to one size first")
        return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(ys, dtype=torch.int64)

    tx, ty = stack("train")
    vx, vy = stack("test")
    return dict(train_x=tx, train_y=ty, test_x=vx, test_y=vy, classes=classes, augment=True)


def _tar_entries(path: Path):
    try:
        with tarfile.open(path) as tar:
            seen: set[str] = set()
            for m in tar:
                parts = Path(m.name).parts
                if m.isfile() and "/".join(parts) in seen:  # tar keeps both: an archive appended to, or built twice
                    raise OtfuseError(f"imagefolder archive {path} holds two members named {m.name}; keep one (tar --delete)")
                seen.add("/".join(parts))
                if (m.issym() or m.islnk()) and not any(p.startswith(".") for p in parts):
                    raise OtfuseError(f"imagefolder archive {path}: {m.name} is a link; archive the files themselves")
                if m.isfile() and _may_be_image(parts):  # a member that cannot be one is never read
                    if m.size > MAX_FILE_BYTES:
                        raise OtfuseError(
                            f"imagefolder archive {path}: {m.name} is {m.size:,} bytes, more than any image "
                            f"otfuse reads ({MAX_FILE_BYTES >> 20} MiB); remove it from the archive"
                        )
                    blob = tar.extractfile(m).read()
                    yield parts, (lambda b=blob: b)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        raise OtfuseError(
            f"imagefolder archive {path} is corrupt or truncated ({type(exc).__name__}: {' '.join(str(exc).split()[:8])}); "
            "give a complete .tar.xz of train/ and test/"
        ) from None


def _may_be_image(parts: tuple[str, ...]) -> bool:
    """Whether an archive member at `parts` can be an image of split/class/file (below one optional top folder)."""
    return not any(p.startswith(".") for p in parts) and (parts[:1] in (("train",), ("test",)) or parts[1:2] in (("train",), ("test",)))


def _read_image_file(p: Path) -> bytes:
    regular_file(p, "imagefolder file")  # a FIFO would block the read forever, a device never end it
    if p.stat().st_size > MAX_FILE_BYTES:
        raise OtfuseError(
            f"imagefolder file {p} is {p.stat().st_size:,} bytes, more than any image otfuse reads ({MAX_FILE_BYTES >> 20} MiB); remove it"
        )
    return p.read_bytes()


def _dir_entries(path: Path):
    """(relative parts, reader) of every file under `path`; a symbolic link is refused, never silently followed or dropped."""

    def unreadable(exc: OSError):  # os.walk would skip the folder silently: a class would vanish from the data
        raise OtfuseError(f"imagefolder {path}: {exc.filename} cannot be read ({exc.strerror}); fix its permissions or move it away")

    for folder, dirs, files in os.walk(path, onerror=unreadable):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(folder) / name
            if p.is_symlink() and not name.startswith("."):
                raise OtfuseError(
                    f"imagefolder {path}: {p.relative_to(path)} is a symbolic link; copy what it points to into the folder instead"
                )
        for name in sorted(files):
            p = Path(folder) / name
            yield p.relative_to(path).parts, functools.partial(_read_image_file, p)


# --- cache and splits -----------------------------------------------------------------------


def _cached(source: _Source, data_dir: Path) -> dict:
    path = data_dir / "cache" / f"{source.key}-v{CACHE_VERSION}.pt"
    if path.is_file():
        try:
            raw = load_torch(path, "dataset cache")
            _check_decoded(raw, path)
            if isinstance(raw.get("mean"), list) and isinstance(raw.get("std"), list):
                if not isinstance(raw.get("digest"), str):  # a cache from before digests: given one, once
                    raw["digest"] = content_digest(raw)
                    save_torch(path, raw)
                return raw
        except OtfuseError:
            pass  # a broken or foreign cache is rebuilt, not reported
    try:
        raw = source.decode()
    except OtfuseError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError) as exc:
        raise OtfuseError(
            f"the files of dataset {source.key.rsplit('-', 1)[0]} in {data_dir} are corrupt or truncated "
            f"({type(exc).__name__}: {' '.join(str(exc).split()[:8])}); delete them so they are fetched again, "
            "or replace them"
        ) from None
    _check_decoded(raw, source.key)
    x = raw["train_x"].float() / 255.0
    raw["mean"] = x.mean(dim=(0, 2, 3)).tolist()
    raw["std"] = x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()  # a constant channel must not divide by zero
    raw["digest"] = content_digest(raw)
    save_torch(path, raw)
    return raw


LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")


def converted(x: torch.Tensor, channels: int, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """uint8 NCHW images `x` as `channels` channels (grey to colour by repetition, colour to grey by luminance) of
    `size` pixels (antialiased bilinear), still uint8: another dataset's images fed to a model of these."""
    have = x.shape[1]
    if have not in (1, 3) or channels not in (1, 3):
        raise OtfuseError(f"images of {have} channels cannot be turned into {channels}; give a dataset of 1 or 3 channels")
    out = []
    for xb in x.split(chunk):
        xf = xb.float()
        if have == 3 and channels == 1:
            xf = (xf * torch.tensor(LUMINANCE, device=xf.device)[None, :, None, None]).sum(1, keepdim=True)
        elif have == 1 and channels == 3:
            xf = xf.expand(-1, 3, -1, -1)
        if tuple(xf.shape[-2:]) != tuple(size):
            xf = torch.nn.functional.interpolate(xf, size=size, mode="bilinear", antialias=True, align_corners=False)
        out.append(xf.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _check_decoded(raw, what) -> None:
    """A decoded dataset is usable: uint8 NCHW images with labels, two or more classes; else one clear error."""
    ok = isinstance(raw, dict) and all(isinstance(raw.get(k), torch.Tensor) for k in ("train_x", "train_y", "test_x", "test_y"))
    ok = ok and raw["train_x"].dtype == torch.uint8 and raw["train_x"].ndim == 4 and len(raw["train_x"]) == len(raw["train_y"])
    ok = ok and raw["test_x"].shape[1:] == raw["train_x"].shape[1:] and len(raw["test_x"]) == len(raw["test_y"])
    if not ok or not isinstance(raw.get("classes"), list):
        raise OtfuseError(f"dataset {what} is not laid out as images and labels; re-create it")
    if len(raw["classes"]) < 2:
        raise OtfuseError(f"dataset {what} has {len(raw['classes'])} class; a classifier needs at least two")


def _with_validation(name: str, raw: dict, val_size: int, seed: int) -> ImageData:
    n = len(raw["train_y"])
    if not 0 <= val_size < n:
        raise OtfuseError(f"--val-size {val_size} must be between 0 and {n - 1}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:val_size].sort().values, order[val_size:].sort().values
    return ImageData(
        name=name,
        classes=list(raw["classes"]),
        train_x=raw["train_x"][train],
        train_y=raw["train_y"][train],
        val_x=raw["train_x"][val],
        val_y=raw["train_y"][val],
        test_x=raw["test_x"],
        test_y=raw["test_y"],
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        augment=bool(raw["augment"]),
        digest=str(raw.get("digest", "")),
    )


# --- batches ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, dtype: torch.dtype):
    """(mean, std) as (1, C, 1, 1) tensors: built once per normalisation and device, not per batch."""
    return (
        torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1),
        torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1),
    )


def normalize(x: torch.Tensor, norm: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> float, per-channel standardised."""
    mean, std = _mean_std(tuple(map(float, norm[0])), tuple(map(float, norm[1])), x.device, dtype)
    return (x.to(dtype) / 255.0 - mean) / std


def augment_batch(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, for a whole uint8 batch at once."""
    n, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=gen.device).to(x.device)
    flip = torch.rand(n, generator=gen, device=gen.device).to(x.device) < 0.5
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], ar_w.flip(0)[None], ar_w[None])
    rows = dy[:, None] + ar_h[None]
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def fixed_sample(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The same `n` images for a given seed: every model measured on it sees exactly these."""
    n = min(n, len(images))
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].to(images.device)]


def batches(
    x: torch.Tensor,
    y: torch.Tensor | None,
    batch_size: int,
    norm: tuple,
    *,
    augment: bool = False,
    seed: int | None = None,
    epoch: int = 0,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (and, with a seed, shuffled and augmented) batches on the data's device.

    The shuffle and augmentation draw from a generator seeded by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted run would. With `world` > 1 each rank takes every
    `world`-th sample of the same order and `batch_size` samples per step.
    """
    n = len(x)
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    if world > 1:
        usable = n - n % world
        order = order[:usable][rank::world]
    order = order.to(x.device)
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    pad = max(1, x.shape[-1] // 8)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        xb = x[idx]
        if augment and gen is not None:
            xb = augment_batch(xb, gen, pad)
        yield normalize(xb, norm), (None if y is None else y[idx])


def image_batches(x: torch.Tensor, batch_size: int, norm: tuple, **kw) -> Iterator[torch.Tensor]:
    """`batches` without labels: for measuring activations and statistics."""
    for xb, _ in batches(x, None, batch_size, norm, **kw):
        yield xb
