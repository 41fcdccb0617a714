"""Tune the fusion options with optuna on the validation split; the test set is read once, at the end.

    otfuse tune A.pt B.pt --n-trials 40                        # study in results/tune-<name>.db
    otfuse tune A.pt B.pt --storage postgresql://host/otfuse   # run on many machines: one shared study
    otfuse tune A.pt B.pt --storage results/study.jsonl        # an optuna journal file (NFS-friendly)
    otfuse fuse A.pt B.pt --config results/tune-<name>-best.json

Each worker adds `--n-trials` trials to the study (or stops at `--timeout`); run the same command
again after a crash and the study carries on where it stopped. After its trials a worker writes
the trials as CSV, the best options as JSON (what `otfuse fuse --config` reads) and a PNG of the
optimisation history, then fuses once more with the best options and reports their test accuracy.
The study is ordinary optuna storage: `optuna-dashboard sqlite:///results/tune-<name>.db` shows it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import nn

from otfuse.align import METHODS
from otfuse.data import ImageData, dataset_slug, normalize
from otfuse.errors import OtfuseError
from otfuse.evaluate import accuracy, accuracy_of_logits, agreement, logits
from otfuse.fuse import FuseConfig, fuse, groups_of
from otfuse.storage import atomic_write_text, writable_dir

RIDGE = (1e-4, 1.0)  # refit's ridge: from nearly a plain least-squares fit to nearly the plain average
N_IMAGES = (250, 500, 1000, 2000)  # activation sample sizes the study may pick
BN_BATCHES = (25, 50, 100, 200)  # BatchNorm recomputation batches the study may pick
# sinkhorn regularisation range (log scale, relative to the largest cost). Kept small on purpose: a strongly
# regularised map blends B's channels into their mean, and the "fusion" scores well only because it
# collapses towards A (a uniform map, no alignment at all, beats exact OT on Fashion-MNIST; README)
REG = (1e-3, 2e-2)
MIX = (0.0, 0.5)  # share of the weight cost mixed into the activation cost


@dataclass
class TuneConfig:
    n_trials: int = 20  # trials this worker adds to the study
    timeout: float = 0.0  # seconds this worker may run trials (0: no limit)
    storage: str = ""  # optuna storage URL, or a journal file (*.jsonl, *.log); empty: a SQLite file in results-dir
    study: str = ""  # study name; empty: <dataset>-<arch>-w<width>-seeds<a>-<b>
    methods: str = ",".join(METHODS)  # comma-separated methods the study may choose from
    sampler_seed: int = 0  # TPE seed (each worker adds the number of trials already in the study)
    results_dir: str = "results"

    def method_list(self) -> list[str]:
        chosen = [m for m in self.methods.split(",") if m]
        bad = [m for m in chosen if m not in METHODS]
        if bad or not chosen:
            raise OtfuseError(f"--methods {self.methods!r}: choose from {', '.join(METHODS)}, comma-separated")
        return chosen


def suggest(trial, methods: list[str], base: FuseConfig) -> FuseConfig:
    """The fusion options of one trial: the search space of the study (validation accuracy decides
    whether, e.g., augmented BatchNorm statistics suit these models)."""
    cfg = FuseConfig(**{**asdict(base), "method": trial.suggest_categorical("method", methods)})
    if cfg.method == "activation":
        cfg.cost = trial.suggest_categorical("cost", ["corr", "euclidean"])
        cfg.point = trial.suggest_categorical("point", ["post", "pre", "both"])
        cfg.mix = trial.suggest_float("mix", *MIX)
    cfg.solver = trial.suggest_categorical("solver", ["emd", "sinkhorn"])
    if cfg.solver == "sinkhorn":
        cfg.reg = trial.suggest_float("reg", *REG, log=True)
    cfg.repair = trial.suggest_categorical("repair", [False, True])
    cfg.refit = trial.suggest_categorical("refit", [False, True])
    if cfg.refit:
        cfg.refit_ridge = trial.suggest_float("refit_ridge", *RIDGE, log=True)
    if cfg.method == "activation" or cfg.repair or cfg.refit:  # only then are training images sampled
        cfg.n_images = trial.suggest_categorical("n_images", list(N_IMAGES))
    cfg.bn_batches = trial.suggest_categorical("bn_batches", list(BN_BATCHES))
    cfg.bn_augment = trial.suggest_categorical("bn_augment", [False, True])
    return cfg


def default_study_name(meta: dict, seeds: list) -> str:
    return f"{dataset_slug(meta['dataset'])}-{meta['arch']}-w{meta['width']}-seeds{'-'.join(str(s) for s in seeds)}"


def open_storage(url: str, results_dir: Path, study: str):
    """An optuna storage: a URL, a journal file, or (empty) results/tune-<study>.db."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if not url:
        url = f"sqlite:///{(results_dir / f'tune-{study}.db').resolve()}"
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
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


def load_study(storage, name: str, seed: int):
    """Create or join the study; several workers may race to create it."""
    import optuna

    for attempt in range(5):
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
            break
        except Exception:  # two workers creating the schema or the study at once: the loser retries
            if attempt == 4:
                raise
            time.sleep(0.5 + attempt)
    # a different seed per worker and per resumption, fixed by the study's history
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=8)
    return study


def val_accuracy(models: list[nn.Module], data: ImageData, cfg: FuseConfig, groups) -> tuple[nn.Module, float, list[float]]:
    """(fused model, its validation accuracy, its agreement with each parent's predictions in %)."""
    fused = fuse(models, data.train_x, data.norm, cfg, groups=groups)[0]
    x, y = data.split("val")
    z = logits(fused, x, data.norm)
    # accuracy alone cannot tell a blend of both parents from one parent with the other blurred away
    agree = [agreement(z, logits(m, x, data.norm)) for m in models]
    return fused, accuracy_of_logits(z, y), agree


def run_study(models: list[nn.Module], data: ImageData, meta: dict, seeds: list, tcfg: TuneConfig,
              base: FuseConfig, progress: bool = True) -> dict:
    """Add this worker's trials to the study, write CSV, JSON and PNG, and report the best trial's
    test accuracy (the only read of the test set). Returns the best options and both accuracies."""
    import optuna

    methods = tcfg.method_list()
    results = writable_dir(tcfg.results_dir)
    name = tcfg.study or default_study_name(meta, seeds)
    study = load_study(open_storage(tcfg.storage, results, name), name, tcfg.sampler_seed)
    groups = groups_of(models, normalize(data.train_x[:1], data.norm).to(next(models[0].parameters()).device))
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial) -> float:
        cfg = suggest(trial, methods, base)
        trial.set_user_attr("options", asdict(cfg))
        trial.set_user_attr("worker", worker)
        _, acc, agree = val_accuracy(models, data, cfg, groups)
        for i, a in enumerate(agree):
            trial.set_user_attr(f"agree_model{i + 1}", round(a, 2))
        return acc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=tcfg.n_trials, timeout=tcfg.timeout or None, show_progress_bar=progress)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise OtfuseError(f"study {name!r} has no completed trial yet; run more trials (--n-trials)")
    best = study.best_trial
    cfg = FuseConfig(**best.user_attrs["options"])
    fused, val, _ = val_accuracy(models, data, cfg, groups)
    x, y = data.split("test")
    test = accuracy(fused, x, y, data.norm)
    paths = write_outputs(study, results / f"tune-{name}", best, test, f"{meta['dataset']} {meta['arch']} w{meta['width']}, seeds {'-'.join(map(str, seeds))}")
    return {"study": name, "trials": len(done), "best_trial": best.number, "val_accuracy": best.value,
            "val_accuracy_again": val, "test_accuracy": test, "options": asdict(cfg), "files": paths}


def write_outputs(study, stem: Path, best, test_acc: float, what: str) -> list[str]:
    """<stem>.csv (every trial), <stem>-best.json (options for `otfuse fuse --config`), <stem>-history.png."""
    from otfuse.results import save_figure

    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration", "datetime_start"))
    frame = frame.drop(columns=[c for c in frame.columns if c.endswith("user_attrs_options")])
    atomic_write_text(f"{stem}.csv", frame.to_csv(index=False))
    best_json = {**best.user_attrs["options"], "_study": study.study_name, "_trial": best.number,
                 "_val_accuracy": round(best.value, 4), "_test_accuracy": round(test_acc, 4)}
    atomic_write_text(f"{stem}-best.json", json.dumps(best_json, indent=2, sort_keys=True) + "\n")
    save_figure(history_figure(study, what), f"{stem}-history.png")
    return [f"{stem}.csv", f"{stem}-best.json", f"{stem}-history.png"]


def history_figure(study, what: str):
    """Validation accuracy of every trial by method, and the best so far."""
    import optuna

    from otfuse.results import pyplot

    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.number)
    fig, ax = pyplot().subplots(figsize=(7, 4.2), dpi=120)
    for method in METHODS:
        pts = [(t.number, t.value) for t in done if t.params.get("method") == method]
        if pts:
            ax.scatter(*zip(*pts), s=18, label=method, alpha=0.8)
    best, run = [], float("-inf")
    for t in done:
        run = max(run, t.value)
        best.append(run)
    ax.step([t.number for t in done], best, where="post", color="black", lw=1.2, label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("fused validation accuracy (%)")
    ax.set_title(f"otfuse tune: {what}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def read_config(path: str | Path) -> dict:
    """Fusion options from a JSON object (keys starting with '_' are notes); a clear error otherwise."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise OtfuseError(f"--config {path}: the file does not exist") from None
    except (OSError, ValueError) as exc:
        raise OtfuseError(f"--config {path}: not a readable JSON file ({exc}); write one with otfuse tune") from None
    if not isinstance(obj, dict):
        raise OtfuseError(f"--config {path}: expected a JSON object of fusion options")
    known = {f.name for f in fields(FuseConfig)}
    opts = {k: v for k, v in obj.items() if not k.startswith("_")}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise OtfuseError(f"--config {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return opts
