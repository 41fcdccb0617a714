"""Fusion where the parties are: a Flower strategy whose aggregation is `fuse()`, and the clients' local training.

    pip install -e '.[flower]'
    flwr run flower/                 # the example App: digits, 3 parties, 2 rounds (docs/federated.md)

    from otfuse.federated import OTFusion
    strategy = OTFusion(reference, images, norm, FuseConfig(head="counts"), min_train_nodes=3)
    result = strategy.start(grid, packed(reference.state_dict()), num_rounds=10)

Each client trains its partition (`iid`, `classes`, `dirichlet`: otfuse's own, as `otfuse train --partition`)
with otfuse's training loop and sends its weights with its image and class counts; the server fuses them on
images no client trained on (`fusion-data`) and sends the fused model back. Every reply is checked before it is
fused: a client that failed, or sent another architecture or class count, wrong shapes, non-finite or
out-of-range values or counts, is left out of that round with one log line naming its node; fewer valid models
than `min_train_nodes` end the run with one line. Flower decodes arrays with numpy's `allow_pickle=False`, and
this module reads nothing else a client sends: nothing is unpickled. Flower's FedAvg and FedProx run the same
clients (`strategy = "fedavg" | "fedprox"`). Weights travel packed, one flat array per dtype (`packed`): Flower
sends every array of a record as an object of its own, one request per hop, so a ResNet18's 122 tensors cost 122
round trips a message. The strategy also takes plain `ArrayRecord(state_dict)` replies and answers in the form it
was started with.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg, FedProx
except ImportError:  # one line where it is used: otfuse federate, the App, an import
    raise ImportError("otfuse.federated needs Flower: pip install -e '.[flower]' (Python 3.11 or newer)") from None

from otfuse.checkpoints import pick_device
from otfuse.data import ImageData, load_dataset
from otfuse.errors import OtfuseError
from otfuse.evaluate import accuracy, accuracy_of_logits, ensemble_of_logits, logits
from otfuse.models import arch_width, build_model
from otfuse.options import build
from otfuse.precision import Precision, resolve_precision
from otfuse.storage import load_torch, save_torch
from otfuse.subsets import PARTITIONS, union_mask
from otfuse.train import TrainConfig, train, training_parts

if TYPE_CHECKING:
    from otfuse.fusion import FuseConfig

STRATEGIES = ("otfusion", "fedavg", "fedprox")
FUSION_DATA = "held-out | union | public:<dataset>"
# a trained network's weights and BatchNorm statistics are far below this; larger values are a broken or hostile model
MAX_WEIGHT = 1e6
CLIENT_ACCS = ("worst", "mean", "best")
ANCHORS = ("largest", "global")
AFTER_FUSION = ("fedavg", "fedprox")
PACKED = "packed-"  # the keys of a packed record: PACKED + a dtype's name, one flat array each
LOG = logging.getLogger("flwr")  # Flower's own log: its console handler shows these lines beside its own


@dataclass
class Settings:
    """A federated run: the App's run config (`flwr run flower/ --run-config "rounds=10 alpha=0.1"`)."""

    dataset: str = "digits"
    arch: str = "resnet18"
    width: int = 8
    partition: str = "dirichlet"  # iid | classes | dirichlet: client i trains part i (its node's partition-id + 1)
    alpha: float = 0.5  # the Dirichlet concentration
    min_size: int = 10  # training images every Dirichlet part holds at least
    split_seed: int = 0
    seed: int = 0  # the shared start's seed; the clients' local randomness derives from it
    init: str = "shared"  # shared (one start sent to all, the federated norm) | own (round 1: each client its own start)
    rounds: int = 2
    local_epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    strategy: str = "otfusion"  # otfusion | fedavg | fedprox (Flower's)
    proximal_mu: float = 0.01  # fedprox's, and the clients' after fusion where after-fusion = fedprox
    fusion_data: str = "held-out"  # the server's images: the validation split no client trains on | union (the oracle) | public:<dataset>
    weighted: bool = True  # clients weighted by their image counts in the average, as FedAvg weighs them
    anchor: str = "largest"  # the model the clients are aligned onto: the largest client's | global (the round's start, weight 0)
    # the rounds the server fuses in; in later ones it averages the clients as FedAvg (0: every round). 1: fusing
    # clients that all trained from one fused model lost ground round by round (docs/federated.md)
    fusion_rounds: int = 1
    # fedprox: above fedavg's clients at the end of both label skews measured (docs/federated.md)
    after_fusion: str = "fedprox"  # the averaged rounds' clients: fedprox (its proximal term, proximal-mu) | fedavg
    head: str = "counts"  # the fused classifier's targets per class: counts (each client by its share) | equal (checked by fuse_config)
    min_clients: int = 2  # fewer valid models in a round end the run
    device: str = "auto"
    data_dir: str = ""
    out: str = ""  # a CSV of the server's test accuracy after each round (appended); empty: none
    state: str = ""  # a file of the rounds done and their global model: a run started again goes on from its last round
    timeout: float = 3600.0  # seconds a round waits for its clients

    def check(self) -> None:
        if self.partition not in PARTITIONS:
            raise OtfuseError(f"partition {self.partition!r}: use {' | '.join(PARTITIONS)}")
        if self.strategy not in STRATEGIES:
            raise OtfuseError(f"strategy {self.strategy!r}: use {' | '.join(STRATEGIES)}")
        if self.init not in ("shared", "own"):
            raise OtfuseError(f"init {self.init!r}: use shared or own")
        if self.after_fusion not in AFTER_FUSION:
            raise OtfuseError(f"after-fusion {self.after_fusion!r}: use {' or '.join(AFTER_FUSION)}")
        if self.anchor not in ANCHORS:
            raise OtfuseError(f"anchor {self.anchor!r}: use {' or '.join(ANCHORS)}")
        if not (self.fusion_data in ("held-out", "union") or self.fusion_data.startswith("public:")):
            raise OtfuseError(f"fusion-data {self.fusion_data!r}: use {FUSION_DATA}")
        for name, least in (("rounds", 1), ("local-epochs", 1), ("min-clients", 1), ("fusion-rounds", 0)):
            if getattr(self, name.replace("-", "_")) < least:
                raise OtfuseError(f"{name} {getattr(self, name.replace('-', '_'))} must be at least {least}")
        if not 0 < self.timeout <= 7 * 86400:
            raise OtfuseError(f"timeout {self.timeout} must be a positive number of seconds, at most a week")


def settings_of(run_config: dict[str, Any]) -> Settings:
    """Settings from a Flower run config (keys as in the App's pyproject.toml: `local-epochs`, `fusion-data`); keys
    `fuse-<option>` are fusion options (`fuse-refit = false`), checked by `fuse_config`."""
    known = {f.name.replace("_", "-"): f for f in fields(Settings)}
    given = {k: v for k, v in run_config.items() if not k.startswith("fuse-")}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise OtfuseError(f"run config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}, fuse-<option>")
    values = {}
    for key, value in given.items():
        want = type(getattr(Settings, known[key].name))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise OtfuseError(f"run config {key} = {value!r}: give a {want.__name__}")
        values[known[key].name] = value
    settings = Settings(**values)
    settings.check()
    return settings


def fuse_config(settings: Settings, run_config: dict[str, Any]) -> FuseConfig:
    """The fusion options: the head from `settings`, then every `fuse-<option>` of the run config, checked."""
    from otfuse.fusion import FuseConfig  # the server's: a client's process never loads the fusion stack

    given = {k[len("fuse-") :].replace("-", "_"): v for k, v in run_config.items() if k.startswith("fuse-")}
    cfg = build(FuseConfig, {"head": settings.head, **given}, "run config fuse-<option>")
    cfg.check(2)
    return cfg


_DATA: dict[tuple[str, str], ImageData] = {}  # one decode per process: a simulation's client runs every round


def dataset(settings: Settings) -> ImageData:
    key = (settings.dataset, settings.data_dir)
    if key not in _DATA:
        _DATA[key] = load_dataset(settings.dataset, settings.data_dir or None)
    return _DATA[key]


def reference_model(settings: Settings, data: ImageData, seed: int | None = None) -> nn.Module:
    """The run's model, initialised from `seed` (default: the shared start's)."""
    torch.manual_seed(settings.seed if seed is None else seed)
    return build_model(settings.arch, arch_width(settings.arch, settings.width), data.in_channels, data.num_classes, data.image_size)


def model_layout(settings: Settings, data: ImageData) -> dict[str, torch.Tensor]:
    """The run's state-dict names, shapes and dtypes as meta tensors: `unpacked` reads no more, and a client that
    only decodes the server's weights draws none of its own (nor touches the process's random state)."""
    with torch.device("meta"):
        model = build_model(settings.arch, arch_width(settings.arch, settings.width), data.in_channels, data.num_classes, data.image_size)
    return model.state_dict()


def party_config(settings: Settings, party: int, parties: int, server_round: int, out: Path, proximal_mu: float = 0.0) -> TrainConfig:
    """Client `party` (1-based) of `parties`: its local epochs of round `server_round` on its partition."""
    return TrainConfig(
        dataset=settings.dataset,
        arch=settings.arch,
        width=settings.width,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        seed=settings.seed + 1000 * server_round + party,  # each client and round its own shuffles and crops
        partition=settings.partition,
        parties=parties,
        party=party,
        alpha=settings.alpha,
        min_size=settings.min_size,
        split_seed=settings.split_seed,
        init_seed=settings.seed if settings.init == "shared" else settings.seed + party,
        data_dir=settings.data_dir or TrainConfig().data_dir,
        device=settings.device,
        keep_start=False,
        proximal_mu=proximal_mu,
        out=str(out),
    )


def local_update(
    settings: Settings, party: int, parties: int, server_round: int, start: dict[str, torch.Tensor] | None, proximal_mu: float = 0.0
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train client `party` (1-based) of `parties` from the global weights `start` (None: its own start) for the
    round's local epochs; its new weights and what the server weighs them by."""
    data = dataset(settings)
    with tempfile.TemporaryDirectory(prefix="otfuse-client-") as tmp:
        cfg = party_config(settings, party, parties, server_round, Path(tmp) / "party.pt", proximal_mu)
        path = train(cfg, data, progress=False, start=start)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    counts = torch.bincount(data.train_y[union_mask(data.train_y, [training_parts(cfg, data)])].cpu(), minlength=data.num_classes)
    metrics = {
        "num-examples": int(counts.sum()),
        "class-counts": [int(c) for c in counts],
        "train-acc": float(ckpt["meta"].get("train_acc", math.nan)),
        "test-acc": float(ckpt["meta"].get("test_acc", math.nan)),  # the local model on the test split, for the log
    }
    return ckpt["state_dict"], metrics


class ClientRejected(Exception):
    """A client's reply that cannot be fused; the message names why."""


class FederationError(OtfuseError):
    """A run that cannot go on (too few valid clients)."""


def client_summary(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """A round's client metrics: the images trained on, and the worst, mean and best local test accuracy the clients
    report (for the log and the bench only: nothing is decided by what a client says of itself)."""
    metrics = [dict(r.metric_records["metrics"]) if "metrics" in r.metric_records else {} for r in records]
    accs = [m["test-acc"] for m in metrics if isinstance(m.get("test-acc"), float) and math.isfinite(m["test-acc"])]
    sizes = [m[weighted_by_key] for m in metrics if isinstance(m.get(weighted_by_key), int)]
    out = {"num-examples": sum(sizes), "clients": len(records)}
    if accs:
        out.update({"worst-client-acc": min(accs), "mean-client-acc": sum(accs) / len(accs), "best-client-acc": max(accs)})
    return MetricRecord(out)


def ensemble_accuracy(
    records: list[RecordDict],
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: tuple,
    precision: Precision,
    key: str = "arrays",
    weighted: bool = True,
) -> float | None:
    """Test accuracy (%) of the clients' ensemble: their softmax outputs averaged, each weighted by its image count
    where `weighted` (as the average weighs them), else equally; replies that fail the checks left out (None: none
    passed). `model` is overwritten."""
    layout = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    classes = _classes_of(model)
    zs, sizes = [], []
    for record in records:
        try:
            state = checked_state(record.array_records[key], layout)
            n, _ = checked_counts(record.metric_records["metrics"], classes, 10**12)
        except (ClientRejected, KeyError):
            continue
        model.load_state_dict(state)
        zs.append(logits(model, x, norm, precision))
        sizes.append(float(n) if weighted else 1.0)
    if not zs:
        return None
    return accuracy_of_logits(ensemble_of_logits(zs, [n / sum(sizes) for n in sizes]), y)


def _group(tensor: torch.Tensor) -> str:
    return PACKED + str(tensor.dtype).removeprefix("torch.")


def packed(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """`state` as an ArrayRecord of one flat array per dtype, the tensors in `state`'s order (`unpacked` reverses it)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for tensor in state.values():
        groups.setdefault(_group(tensor), []).append(tensor.detach().cpu().reshape(-1))
    return ArrayRecord({key: torch.cat(parts) for key, parts in groups.items()})


def unpacked(arrays: Any, layout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict an ArrayRecord carries: a `packed` one cut into `layout`'s names, shapes and dtypes, any other
    as Flower decodes it; `ClientRejected` when it cannot be decoded or a packed array's length does not fit."""
    try:
        flat = arrays.to_torch_state_dict()
    except Exception as e:  # numpy refuses pickled (object) arrays, malformed bytes fail to parse
        raise ClientRejected(f"its weights cannot be decoded ({type(e).__name__}: {str(e)[:80]})") from None
    if not any(key.startswith(PACKED) for key in flat):
        return flat
    sizes = Counter()
    for tensor in layout.values():
        sizes[_group(tensor)] += tensor.numel()
    if set(flat) != set(sizes):
        raise ClientRejected(f"its packed arrays are {', '.join(sorted(flat))}, the model's {', '.join(sorted(sizes))}")
    for key, size in sizes.items():
        if flat[key].dim() != 1 or flat[key].numel() != size:
            raise ClientRejected(f"its {key} holds {flat[key].numel()} values, the model's {size}: another architecture or width")
    state, offset = {}, Counter()
    for name, want in layout.items():
        key = _group(want)
        # cast: Flower's FedAvg averages integer buffers (BatchNorm's batch counts) into floats
        state[name] = flat[key][offset[key] : offset[key] + want.numel()].view(want.shape).to(want.dtype)
        offset[key] += want.numel()
    return state


def checked_state(arrays: Any, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A client's weights as a state dict (`unpacked`), after checking they fit `reference` (names, shapes, dtypes)
    and are finite and in range; `ClientRejected` naming the first fault otherwise."""
    state = unpacked(arrays, reference)
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:
        first = (missing + extra)[0]
        raise ClientRejected(f"another architecture or class count: {len(missing)} tensors missing, {len(extra)} unknown ({first})")
    for name, want in reference.items():
        got = state[name]
        if got.shape != want.shape:
            raise ClientRejected(f"{name} has shape {tuple(got.shape)}, the model's is {tuple(want.shape)}: another architecture or width")
        if got.dtype != want.dtype:
            raise ClientRejected(f"{name} is {got.dtype}, the model's {want.dtype}")
        if got.is_floating_point():
            if not bool(torch.isfinite(got).all()):
                raise ClientRejected(f"{name} holds NaN or infinite values")
            if got.numel() and float(got.abs().max()) > MAX_WEIGHT:
                raise ClientRejected(f"{name} holds values beyond {MAX_WEIGHT:g}")
            if name.endswith("running_var") and bool((got < 0).any()):
                raise ClientRejected(f"{name} holds negative variances")
    return state


def checked_counts(metrics: Any, num_classes: int, most: int) -> tuple[int, torch.Tensor]:
    """A client's image count and class counts, after checking they are whole, non-negative, consistent and at
    most the dataset's `most` training images."""
    try:
        n, counts = metrics["num-examples"], metrics["class-counts"]
    except (KeyError, TypeError):
        raise ClientRejected("its metrics lack num-examples or class-counts") from None
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= most:
        raise ClientRejected(f"num-examples {n!r} is not a count from 1 to {most}")
    if not (isinstance(counts, list) and len(counts) == num_classes and all(isinstance(c, int) and c >= 0 for c in counts)):
        raise ClientRejected(f"class-counts is not {num_classes} non-negative whole numbers")
    if sum(counts) != n:
        raise ClientRejected(f"class-counts sum to {sum(counts)}, not num-examples {n}")
    return n, torch.tensor(counts)


class OTFusion(FedAvg):
    """FedAvg's sampling and messages; the aggregation is otfuse's fusion of the valid replies, on the server's
    `images` (uint8, normalised by `norm`), clients weighted by their image counts where `weighted`, in rounds 1 to
    `fusion_rounds` (0: every round); in later rounds FedAvg's average of the same valid replies, trained with
    FedProx's proximal term `proximal_mu` where it is above 0."""

    def __init__(
        self,
        reference: nn.Module,
        images: torch.Tensor,
        norm: tuple,
        cfg: FuseConfig,
        weighted: bool = True,
        most: int = 10**9,
        anchor: str = "largest",
        fusion_rounds: int = 1,
        proximal_mu: float = 0.0,
        **kwargs,
    ):
        super().__init__(**{"train_metrics_aggr_fn": client_summary, **kwargs})  # Flower's own trusts every reply's metrics
        self.reference = copy.deepcopy(reference).cpu().eval()
        self.state = {k: v.detach().cpu() for k, v in self.reference.state_dict().items()}
        self.num_classes = _classes_of(self.reference)
        self.images, self.norm, self.cfg, self.weighted, self.most, self.anchor = images, norm, cfg, weighted, most, anchor
        self.fusion_rounds = fusion_rounds  # fused in rounds 1..fusion_rounds, averaged after (0: fused in every round)
        self.proximal_mu = proximal_mu  # the clients' in the averaged rounds
        self.round = 0  # the round being aggregated, counted from the run's first (a resumed run's offset added)
        self.round_start: dict[str, torch.Tensor] | None = None  # the round's global model, as sent
        self.packs = False  # the round's global model came `packed`: the fused one goes back packed too
        self.left_out: dict[int, list[str]] = {}  # round -> the lines of the clients left out
        self.sampled: dict[int, list[int]] = {}  # round -> the nodes asked to train

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> list[Message]:
        self.round = server_round + int(config.get("round-offset", 0))
        if self.proximal_mu and self._averages():
            config["proximal-mu"] = self.proximal_mu  # as Flower's FedProx asks its clients
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        self.round_start = unpacked(arrays, self.state)
        self.packs = any(key.startswith(PACKED) for key in arrays)
        return messages

    def _leave_out(self, server_round: int, node: int, why: str) -> None:
        line = f"round {server_round}: node {node} left out: {why}"
        LOG.warning(line)
        self.left_out.setdefault(server_round, []).append(line)

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        clients = self._valid(server_round, replies)
        t0 = time.time()
        state = self._averaged(clients) if self._averages() else self._fused(clients)
        summary = self.train_metrics_aggr_fn([msg.content for msg in replies if not msg.has_error()], self.weighted_by_key)
        metrics = {**summary, "clients": len(clients), "left-out": len(replies) - len(clients), "fusion-seconds": time.time() - t0}
        return packed(state) if self.packs else ArrayRecord(state), MetricRecord(metrics)

    def _averages(self) -> bool:
        """Whether this round is past the fused ones."""
        return 0 < self.fusion_rounds < self.round

    def _fused(self, clients: list[tuple[nn.Module, int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from otfuse.fusion import fuse

        models, weights, counts = self._fusion_order(clients)
        # the distillation stage runs where asked for (fuse-distill-epochs), not by default: unmeasured in rounds yet
        distill = replace(self.cfg.distill, epochs=0.0) if self.cfg.distill.epochs < 0 else self.cfg.distill  # < 0: auto
        cfg = replace(self.cfg, weights=",".join(weights), distill=distill)
        fusion = fuse([m.to(self.images.device) for m in models], self.images, self.norm, cfg, class_counts=torch.stack(counts))
        return {k: v.detach().cpu() for k, v in fusion.fused.state_dict().items()}

    def _averaged(self, clients: list[tuple[nn.Module, int, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """FedAvg's average of the clients (by image count where `weighted`): after the fused rounds every client
        trained from one fused model, so their channels already correspond."""
        from otfuse.fusion import average

        sizes = [float(n) if self.weighted else 1.0 for _, n, _ in clients]
        model = average([m for m, _, _ in clients], [n / sum(sizes) for n in sizes])
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def _valid(self, server_round: int, replies: list[Message]) -> list[tuple[nn.Module, int, torch.Tensor]]:
        """(model, image count, class counts) of every valid reply; each sampled node left out said in one line; too
        few for the round, one FederationError."""
        answered = {msg.metadata.src_node_id for msg in replies}
        for node in self.sampled.get(server_round, []):
            if node not in answered:  # Flower stops waiting at the round's timeout
                self._leave_out(server_round, node, "no reply within the round's timeout")
        clients = []
        for msg in replies:
            try:
                clients.append(self._client(msg))
            except ClientRejected as e:
                self._leave_out(server_round, msg.metadata.src_node_id, str(e))
        if len(clients) < max(self.min_train_nodes, 1):
            raise FederationError(
                f"round {server_round}: {len(clients)} valid client model(s) of the {self.min_train_nodes} required "
                f"({len(replies)} replied); the run ends"
            )
        return clients

    def _fusion_order(self, clients: list[tuple[nn.Module, int, torch.Tensor]]) -> tuple[list[nn.Module], list[str], list[torch.Tensor]]:
        """The models in fusion order with their `--weights` and class counts: the largest client first (the others
        align to it), or with `anchor = global` the round's start first, weighted 0 (every client aligned onto it)."""
        clients = sorted(clients, key=lambda c: -c[1])
        models, counts = [m for m, _, _ in clients], [c for _, _, c in clients]
        weights = [str(n) if self.weighted else "1" for _, n, _ in clients]  # not weighted: equal
        if self.anchor == "global" and self.round_start is not None:
            start = copy.deepcopy(self.reference)
            start.load_state_dict(self.round_start)
            models, weights, counts = [start, *models], ["0", *weights], [torch.zeros_like(counts[0]), *counts]
        return models, weights, counts

    def _client(self, msg: Message) -> tuple[nn.Module, int, torch.Tensor]:
        if msg.has_error():
            raise ClientRejected(f"its ClientApp failed ({str(msg.error.reason)[:120]})")
        content = msg.content
        if self.arrayrecord_key not in content.array_records or "metrics" not in content.metric_records:
            raise ClientRejected("its reply holds no weights or no metrics")
        state = checked_state(content.array_records[self.arrayrecord_key], self.state)
        n, counts = checked_counts(content.metric_records["metrics"], self.num_classes, self.most)
        model = copy.deepcopy(self.reference)
        model.load_state_dict(state)
        return model, n, counts


def _classes_of(model: nn.Module) -> int:
    """The class count: the out-features of the last Linear layer."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features


def server_images(settings: Settings, data: ImageData) -> torch.Tensor:
    """The images the server fuses on: `held-out` (the validation split, which no client trains on), `union` (every
    training image: the oracle) or `public:<dataset>` (another dataset's, as the clients' channels and size)."""
    if settings.fusion_data == "held-out":
        if len(data.val_x) < 2:
            raise OtfuseError(
                f"fusion-data held-out: {settings.dataset} holds out {len(data.val_x)} validation images; use public:<dataset>"
            )
        return data.val_x
    if settings.fusion_data == "union":
        return data.train_x
    from otfuse.inputs import public_images

    return public_images(settings.fusion_data[len("public:") :], data, settings.data_dir or None)


def strategy_for(
    settings: Settings, run_config: dict[str, Any], data: ImageData, reference: nn.Module, device: torch.device, summary=client_summary
) -> FedAvg:
    """The Flower strategy `settings.strategy` names, sampling every connected client each round, the clients'
    metrics summarised by `summary`."""
    common = {
        "fraction_evaluate": 0.0,
        "min_train_nodes": settings.min_clients,
        "min_available_nodes": settings.min_clients,
        "train_metrics_aggr_fn": summary,
    }
    if settings.strategy == "fedavg":
        return FedAvg(**common)
    if settings.strategy == "fedprox":
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    images = server_images(settings, data).to(device)
    cfg = fuse_config(settings, run_config)
    args = (reference.to(device), images, data.norm, cfg, settings.weighted, len(data.train_y), settings.anchor, settings.fusion_rounds)
    mu = settings.proximal_mu if settings.after_fusion == "fedprox" else 0.0
    return OTFusion(*args, proximal_mu=mu, **common)


def _rounded(value: Any) -> float | str:
    return "" if value is None else round(float(value), 2)


def resumed(state: str) -> tuple[int, dict[str, torch.Tensor] | None, list[dict]]:
    """The rounds done, the global weights after them and their rows, from the run's `state` file (none: 0, None, [])."""
    if not state or not Path(state).is_file():
        return 0, None, []
    saved = load_torch(state, "federated run state")
    return int(saved["round"]), saved["weights"], list(saved["rows"])


def serve(grid: Any, context: Any, settings: Settings | None = None, sink: list | None = None) -> list[dict]:
    """The ServerApp's main: the run's strategy from the shared start for `rounds` rounds (from the state file's
    last round where `state` names one), one row per round: the server's test accuracy, the clients' own, seconds and
    bytes sent both ways, logged and appended to `out` and `sink`. A run that cannot go on ends with one line."""
    run_config = dict(context.run_config)
    settings = settings or settings_of(run_config)
    data = dataset(settings)
    device = pick_device(settings.device)
    precision = resolve_precision("auto", device)
    reference = reference_model(settings, data).to(device)
    done, weights, rows = resumed(settings.state)
    latest: dict[str, Any] = {}  # the clients' summary of the round being aggregated

    test_x, test_y = data.test_x.to(device), data.test_y.to(device)

    def summary(records: list[RecordDict], key: str) -> MetricRecord:
        latest.clear()
        latest.update(client_summary(records, key))
        out = MetricRecord(dict(latest))
        t0 = time.time()  # the bench's reference, not the federation's work: kept out of the round's seconds
        key_ = strategy.arrayrecord_key
        latest["ensemble-acc"] = ensemble_accuracy(records, reference, test_x, test_y, data.norm, precision, key_, settings.weighted)
        latest["ensemble-seconds"] = time.time() - t0
        return out

    strategy = strategy_for(settings, run_config, data, reference, device, summary)
    layout = {k: v.clone() for k, v in reference.state_dict().items()}
    model_bytes = packed(layout).count_bytes()
    clock = [time.time()]

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        r = server_round + done
        state = unpacked(arrays, layout)
        reference.load_state_dict(state)
        acc = accuracy(reference.eval(), test_x, test_y, data.norm, precision)
        row = {
            "strategy": settings.strategy,
            "round": r,
            "test_acc": round(acc, 2),
            **{f"{k}_client_acc": _rounded(latest.get(f"{k}-client-acc")) for k in CLIENT_ACCS},
            "ensemble_acc": _rounded(latest.get("ensemble-acc")),
            "seconds": round(time.time() - clock[0] - latest.get("ensemble-seconds", 0.0), 1),
            "bytes": 0 if server_round == 0 else 2 * int(latest.get("clients", 0)) * model_bytes,
        }
        latest.clear()
        clock[0] = time.time()
        if server_round or not rows:  # a resumed run's start is the round already recorded
            LOG.info("otfuse: round %d, %s: test accuracy %.2f%% (%.1f s)", r, settings.strategy, acc, row["seconds"])
            rows.append(row)
            if settings.out:
                _append_rows(Path(settings.out), [row])
            if settings.state:
                save_torch(settings.state, {"round": r, "weights": state, "rows": rows})
        return MetricRecord({"test-acc": acc})

    if done < settings.rounds:
        start = weights if weights is not None else reference.state_dict()
        try:
            strategy.start(
                grid=grid,
                initial_arrays=packed(start),
                num_rounds=settings.rounds - done,
                timeout=settings.timeout,
                train_config=ConfigRecord({"init": settings.init, "round-offset": done}),
                evaluate_fn=evaluate,
            )
        except FederationError as e:
            LOG.error("otfuse: %s", e)
            raise
    if sink is not None:
        sink.extend(rows)
    return rows


def _append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["strategy"])
        if new:
            writer.writeheader()
        writer.writerows(rows)


def client_train(msg: Any, context: Any, settings: Settings | None = None) -> Any:
    """The ClientApp's train: this node's partition (`partition-id`, `num-partitions` of its node config) trained
    from the global weights (round 1 of `init = own`: from its own start), sent back with its counts."""
    settings = settings or settings_of(dict(context.run_config))
    node = context.node_config
    party, parties = int(node["partition-id"]) + 1, int(node["num-partitions"])
    config = msg.content["config"]
    server_round = int(config.get("server-round", 1)) + int(config.get("round-offset", 0))
    own_start = config.get("init", "shared") == "own" and server_round == 1
    start = None if own_start else unpacked(msg.content["arrays"], model_layout(settings, dataset(settings)))
    state, metrics = local_update(settings, party, parties, server_round, start, float(config.get("proximal-mu", 0.0)))
    return Message(RecordDict({"arrays": packed(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


def apps(settings: Settings | None = None, sink: list | None = None) -> tuple[ServerApp, ClientApp]:
    """A ServerApp and a ClientApp running `settings` (None: each reads the run config), the server's round rows
    appended to `sink`: `flwr.simulation.run_simulation` takes them as they are; the App in flower/ exposes them to
    `flwr run`."""
    server, client = ServerApp(), ClientApp()
    server.main()(lambda grid, context: serve(grid, context, settings, sink))
    client.train()(lambda msg, context: client_train(msg, context, settings))
    return server, client


def simulate(settings: Settings, clients: int) -> list[dict]:
    """The federation on Flower's simulation engine in this process, one SuperNode per client, each client on one
    core; the server's rows, one per round (round 0: the start)."""
    from flwr.simulation import run_simulation

    settings.check()
    fuse_config(settings, {})  # a bad fusion option is one line here, before any SuperNode starts
    if not settings.min_clients <= clients <= 1000:
        raise OtfuseError(f"--clients {clients}: give from --min-clients ({settings.min_clients}) to 1000")
    dataset(settings)  # a bad dataset is one line here, before any SuperNode starts
    rows: list[dict] = []
    server, client = apps(settings, rows)
    cores = max(1, len(os.sched_getaffinity(0)))
    run_simulation(server, client, clients, backend_config={"init_args": {"num_cpus": cores}, "client_resources": {"num_cpus": 1}})
    if len(rows) != settings.rounds + 1:
        raise OtfuseError(f"the federation ended after {max(len(rows) - 1, 0)} of {settings.rounds} rounds: see the log above")
    return rows
