"""Tune the fusion options with optuna on the validation split; the test set is read once, at the end.

    otfuse tune A.pt B.pt --n-trials 40                        # study in results/tune-<name>.db
    otfuse tune A.pt B.pt --storage postgresql://host/otfuse   # run on many machines: one shared study
    otfuse tune A.pt B.pt --storage results/study.jsonl        # an optuna journal file (NFS-friendly)
    otfuse fuse A.pt B.pt --config results/tune-<name>-best.json

Each worker adds `--n-trials` completed trials to the study (or stops at `--timeout`); run the same
command again after a crash and the study carries on where it stopped. Workers sharing a study
never repeat each other's trials: each seeds its sampler from its own identity, and a trial whose
options another trial already holds is dropped and drawn again. After its trials a worker writes
the trials as CSV, the best options as JSON (what `otfuse fuse --config` reads) and a PNG of the
optimisation history, then fuses once more with the best options and reports their test accuracy.
The study is ordinary optuna storage: `optuna-dashboard sqlite:///results/tune-<name>.db` shows it.
optuna is imported inside the functions that use it: it is heavy, and only this command needs it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from otfuse.align import METHODS
from otfuse.data import ImageData, dataset_slug
from otfuse.errors import OtfuseError
from otfuse.evaluate import accuracy, accuracy_of_logits, agreement, logits
from otfuse.fusion import FuseConfig, fuse
from otfuse.models import arch_folder
from otfuse.options import build, flatten
from otfuse.plots import history_figure, save_figure
from otfuse.precision import resolve_precision
from otfuse.storage import atomic_write_text, inputs_name, regular_file, writable_dir

RIDGE = (1e-4, 1.0)  # refit's ridge: from nearly a plain least-squares fit to nearly the plain average
N_IMAGES = (250, 500, 1000, 2000)  # sample sizes the study may pick for the alignment and the refit
BN_BATCHES = (25, 50, 100, 200)  # BatchNorm recomputation batches the study may pick
# sinkhorn regularisation range (log scale, relative to the largest cost). Kept small on purpose: a strongly
# regularised map blends B's channels into their mean, and the "fusion" scores well only because it
# collapses towards A (a uniform map, no alignment at all, beats exact OT on Fashion-MNIST; docs/defaults.md)
REG = (5e-3, 5e-2)  # below 5e-3 Sinkhorn need not converge in its iterations (transport_map refuses such a plan)
MAX_REFUSED = 5  # refused trials in a row after which the options pinned, not the draws, are what is wrong
MIX = (0.0, 0.5)  # share of the weight cost mixed into the activation cost
# the study's choices per option (the method's: --methods); docs/interpolation-and-tuning.md renders them with the ranges
CHOICES: dict[str, tuple] = {
    "cost": ("corr", "euclidean"),
    "point": ("post", "pre", "both"),
    "n_images": N_IMAGES,
    "marginals": ("uniform", "importance"),
    "solver": ("emd", "sinkhorn"),
    "repair": (False, True),
    "refit": (False, True),
    "refit_n_images": N_IMAGES,
    "bn_batches": BN_BATCHES,
    "bn_augment": (False, True),
}
RANGES: dict[str, tuple[float, float, bool]] = {"mix": (*MIX, False), "reg": (*REG, True), "refit_ridge": (*RIDGE, True)}  # low, high, log


@dataclass
class TuneConfig:
    n_trials: int = 20  # completed trials this worker adds to the study
    timeout: float = 0.0  # seconds this worker may run trials (0: no limit)
    storage: str = ""  # optuna storage URL, or a journal file (*.jsonl, *.log); empty: a SQLite file in results-dir
    study: str = ""  # study name; empty: <dataset>-<arch>-w<width>-seeds<a>-<b>
    methods: str = ""  # comma-separated methods the study may choose from; empty: every registered one
    sampler_seed: int = 0  # TPE seed, combined with the worker's identity
    results_dir: str = "results"

    def check(self) -> None:
        self.method_list()
        if self.study and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", self.study):
            raise OtfuseError(
                f"--study {self.study!r}: a study name goes into file names in --results-dir; use letters, digits "
                "and . _ + - (at most 100, no path separators), e.g. --study fmnist-w16"
            )
        if self.n_trials < 1:
            raise OtfuseError(f"--n-trials {self.n_trials} must be at least 1")
        if not self.timeout >= 0:
            raise OtfuseError(f"--timeout {self.timeout} must be 0 (no limit) or more seconds")

    def method_list(self) -> list[str]:
        chosen = [m for m in self.methods.split(",") if m] or list(METHODS)
        bad = [m for m in chosen if m not in METHODS]
        if bad:
            raise OtfuseError(f"--methods {self.methods!r}: choose from {', '.join(METHODS)}, comma-separated")
        return chosen


def suggest(
    trial, methods: list[str], base: FuseConfig, mixed_widths: bool = False, other_width: bool = False, fixed: frozenset[str] = frozenset()
) -> FuseConfig:
    """The fusion options of one trial: the search space of the study (validation accuracy decides
    whether, e.g., augmented BatchNorm statistics suit these models). Options in `fixed` (given on the
    command line or in --config) keep `base`'s value and are not searched. Parents of different widths
    keep weight costs out (they need one width); any parent of another width than the fused model's
    (`other_width`) keeps REPAIR out (it matches statistics channel for channel)."""
    flat = flatten(base)
    pick = lambda name, draw: flat[name] if name in fixed else draw(name)
    categorical = lambda choices: lambda name: trial.suggest_categorical(name, choices)
    uniform = lambda low, high, log=False: lambda name: trial.suggest_float(name, low, high, log=log)
    choose = lambda name: pick(name, categorical(list(CHOICES[name])))
    draw = lambda name: pick(name, uniform(*RANGES[name][:2], log=RANGES[name][2]))
    method = pick("method", categorical(methods))
    align = replace(base.align, method=method)
    if method == "activation":
        align.cost = choose("cost")
        align.point = choose("point")
        align.mix = 0.0 if mixed_widths else draw("mix")
    if METHODS[method].needs_images:
        align.n_images = choose("n_images")
    if method != "weight-matching":  # weight matching is a hard assignment: masses do not enter it
        align.marginals = choose("marginals")
    align.solver = choose("solver")
    if align.solver == "sinkhorn":
        align.reg = draw("reg")
    repair = replace(base.repair, enabled=False if other_width else choose("repair"))
    refit = replace(base.refit, enabled=choose("refit"))
    if refit.enabled:
        refit.ridge = draw("refit_ridge")
        refit.n_images = choose("refit_n_images")
    bn = replace(base.bn, batches=choose("bn_batches"), augment=choose("bn_augment"))
    return replace(base, align=align, bn=bn, repair=repair, refit=refit)


def default_study_name(metas: list[dict], parents: list[str], width: int = 0) -> str:
    """<dataset>-<arch>-w<width>-<A's stem>-<B's stem>-<hash of both files>, with the parents' widths where they
    differ from the fused model's: named by what the inputs are, never by the seeds their metadata inherits."""
    m = metas[0]
    width = width or m["width"]
    widths = "" if all(x["width"] == width for x in metas) else "-from-" + "-".join(f"w{x['width']}" for x in metas)
    return f"{dataset_slug(m['dataset'])}-{arch_folder(m['arch'], width)}{widths}-{inputs_name(parents)}"


def open_storage(url: str, results_dir: Path, study: str):
    """An optuna storage: a URL, a journal file, or (empty) results/tune-<study>.db."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if not url:
        url = f"sqlite:///{(results_dir / f'tune-{study}.db').resolve()}"
    if "://" not in url:
        writable_dir(Path(url).parent)
        _check_journal(Path(url))
        return JournalStorage(JournalFileBackend(url))
    # SQLite serialises writers: wait for the lock instead of failing when workers commit together;
    # heartbeats let a later worker mark trials of a killed worker as failed
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental in optuna, and they work
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120)
        except Exception as exc:  # workers creating the schema at once collide: the losers retry
            if attempt == 5:  # a bad URL or an unreachable server: say which
                raise OtfuseError(f"--storage {url!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
            time.sleep(0.5 + attempt)


def _check_journal(path: Path) -> None:
    """An existing --storage file must be an optuna journal (JSON lines): anything else is the user's file, never appended to."""
    if path.is_dir():
        raise OtfuseError(f"--storage {path} is a directory; give a journal file path (e.g. results/study.jsonl) or a database URL")
    if regular_file(path, "--storage", missing_ok=True) is None or path.stat().st_size == 0:
        return
    try:
        with open(path, "rb") as f:
            first = json.loads(f.readline())
        ok = isinstance(first, dict) and "op_code" in first
    except (ValueError, OSError):
        ok = False
    if not ok:
        raise OtfuseError(f"--storage {path} exists and is not an optuna journal; give a new file or a journal written by otfuse tune")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def load_study(storage, name: str, seed: int, worker: str):
    """Create or join the study; several workers may race to create it. The sampler's seed comes from
    the worker's identity, so two workers never draw the same sequence."""
    import optuna

    for attempt in range(5):
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
            break
        except Exception as exc:  # two workers creating the schema or the study at once: the loser retries
            if attempt == 4:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
                raise OtfuseError(
                    f"study {name!r} cannot be opened in its storage ({type(exc).__name__}: {first}); give another --study or --storage"
                ) from None
            time.sleep(0.5 + attempt)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise OtfuseError(f"study {name!r} in this storage minimises its objective, so otfuse did not make it; give another --study")
    study.sampler = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + zlib.crc32(worker.encode())) % 2**31, n_startup_trials=8)
    return study


def val_accuracy(
    models: list[nn.Module], data: ImageData, cfg: FuseConfig, target: nn.Module | None = None
) -> tuple[nn.Module, float, list[float]]:
    """(fused model, its validation accuracy, its agreement with each parent's predictions in %)."""
    fusion = fuse(models, data.train_x, data.norm, cfg, target=target)
    fused, precision = fusion.fused, fusion.precision
    x, y = data.split("val")
    z = logits(fused, x, data.norm, precision=precision)
    # accuracy alone cannot tell a blend of both parents from one parent with the other blurred away
    agree = [agreement(z, logits(m, x, data.norm, precision=precision)) for m in models]
    return fused, accuracy_of_logits(z, y), agree


def run_study(
    models: list[nn.Module],
    data: ImageData,
    metas: list[dict],
    parents: list[str],
    tcfg: TuneConfig,
    base: FuseConfig,
    progress: bool = True,
    target: nn.Module | None = None,
    width: int = 0,
    fixed: frozenset[str] = frozenset(),
) -> dict:
    """Add this worker's trials to the study, write CSV, JSON and PNG, and report the best trial's
    test accuracy (the only read of the test set). Returns the best options and both accuracies.
    With `target` (the parents' architecture at `width`) the parents are fused into that width;
    parents of different widths restrict the study to methods that align mixed widths. Options named in
    `fixed` keep `base`'s values in every trial."""
    import optuna

    tcfg.check()
    methods = tcfg.method_list()
    meta, seeds = metas[0], [m.get("seed", "?") for m in metas]
    mixed = len({m["width"] for m in metas}) > 1
    if mixed:
        methods = [m for m in methods if METHODS[m].mixed_widths]
        if not methods:
            raise OtfuseError(
                f"--methods {tcfg.methods!r}: none of them aligns models of other widths; add "
                + " or ".join(m.name for m in METHODS.values() if m.mixed_widths)
            )
    results = writable_dir(tcfg.results_dir)
    data.split("val")  # the objective: a model trained without a validation split cannot be tuned
    name = tcfg.study or default_study_name(metas, parents, width)
    worker = worker_id()
    try:
        storage = open_storage(tcfg.storage, results, name)
    except OtfuseError:
        raise
    except Exception as exc:  # a journal file that is not one, a folder, ...
        raise OtfuseError(
            f"--storage {tcfg.storage or results}: cannot open it as an optuna storage ({type(exc).__name__}); "
            "give a new file or a database URL"
        ) from None
    study = load_study(storage, name, tcfg.sampler_seed, worker)

    def objective(trial) -> float:
        cfg = suggest(trial, methods, base, mixed, mixed or bool(width and width != metas[0]["width"]), fixed)
        others = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING))
        if any(t.number != trial.number and t.params == trial.params for t in others):
            raise optuna.TrialPruned("these options are already in the study")  # drawn again: never a repeated trial
        trial.set_user_attr("options", flatten(cfg))
        trial.set_user_attr("worker", worker)
        try:
            _, acc, agree = val_accuracy(models, data, cfg, target)
        except OtfuseError as exc:  # options the fusion refuses (a Sinkhorn plan that did not converge): this trial only
            trial.set_user_attr("refused", str(exc))
            raise optuna.TrialPruned(str(exc)) from None
        for i, a in enumerate(agree):
            trial.set_user_attr(f"agree_model{i + 1}", round(a, 2))
        return acc

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed or interrupted trial is reported once, by otfuse
    mine = lambda: sum(
        1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.user_attrs.get("worker") == worker
    )
    start, deadline = time.time(), time.time() + tcfg.timeout if tcfg.timeout else None
    refused: list[str] = []
    while mine() < tcfg.n_trials and (deadline is None or time.time() < deadline):
        left = None if deadline is None else max(1.0, deadline - time.time())
        before = mine()
        study.optimize(objective, n_trials=1, timeout=left, show_progress_bar=False)
        last = study.trials[-1] if study.trials else None
        refused = refused + [last.user_attrs["refused"]] if mine() == before and last and "refused" in last.user_attrs else []
        if len(refused) >= MAX_REFUSED:
            raise OtfuseError(f"{MAX_REFUSED} trials in a row drew options the fusion refuses, the last: {refused[-1]}")
        if progress:
            print(f"trial {mine()}/{tcfg.n_trials} of this worker ({time.time() - start:.0f} s)", flush=True)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise OtfuseError(f"study {name!r} has no completed trial yet; run more trials (--n-trials)")
    best = study.best_trial
    if not isinstance(best.user_attrs.get("options"), dict):
        raise OtfuseError(f"study {name!r} holds trials otfuse did not write (trial {best.number} has no options); give another --study")
    cfg = build(FuseConfig, best.user_attrs["options"])
    fused, val, _ = val_accuracy(models, data, cfg, target)
    x, y = data.split("test")
    test = accuracy(fused, x, y, data.norm, resolve_precision(cfg.precision, next(fused.parameters()).device))
    what = f"{meta['dataset']} {meta['arch']} w{meta['width']}, seeds {'-'.join(map(str, seeds))}"
    paths = write_outputs(study, results / f"tune-{name}", best, test, what)
    return {
        "study": name,
        "trials": len(done),
        "best_trial": best.number,
        "val_accuracy": best.value,
        "val_accuracy_again": val,
        "test_accuracy": test,
        "options": flatten(cfg),
        "files": paths,
    }


def write_outputs(study, stem: Path, best, test_acc: float, what: str) -> list[str]:
    """<stem>.csv (every trial), <stem>-best.json (options for `otfuse fuse --config`), <stem>-history.png."""
    import optuna

    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration", "datetime_start"))
    frame = frame.drop(columns=[c for c in frame.columns if c.endswith("user_attrs_options")])
    atomic_write_text(f"{stem}.csv", frame.to_csv(index=False))
    best_json = {
        **best.user_attrs["options"],
        "_study": study.study_name,
        "_trial": best.number,
        "_val_accuracy": round(best.value, 4),
        "_test_accuracy": round(test_acc, 4),
    }
    atomic_write_text(f"{stem}-best.json", json.dumps(best_json, indent=2, sort_keys=True) + "\n")
    done = [(t.number, t.params.get("method", "?"), t.value) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    save_figure(history_figure(done, what), f"{stem}-history.png")
    return [f"{stem}.csv", f"{stem}-best.json", f"{stem}-history.png"]
