#!/usr/bin/env python
"""Federated rounds on Flower's simulation engine: otfuse's fusion against Flower's FedAvg and FedProx.

    python bench/bench_federated.py --runs dir0.5-otfusion,dir0.5-fedavg     # some runs
    python bench/bench_federated.py                                           # every run (hours on 2 cores)
    nohup python bench/bench_federated.py > federated.log &                   # in the background, resumable

A run is K = 4 CIFAR-10 (JPEG copy) parties of a Dirichlet(alpha) split, width 16, all from one shared start, and a
strategy: `otfusion` (the server fuses the clients' models on CIFAR-100's training images, a public set no client
holds, as FedDF does; `-global`: each aligned onto the round's start, not the largest client; `-then-fedavg`: fused
in round 1 only, averaged as FedAvg after; `-then-fedprox`: FedProx's clients after), Flower's `fedavg` or `fedprox`
(mu 0.01), for 10 rounds of 3 local epochs at otfuse train's peak lr 0.2 (`-lr0.05`: 0.05); `oneshot-*` runs one
round of 30 local epochs (each client's whole training budget, sent once). After every round the server's test
accuracy, the clients' own (worst, mean, best), seconds and bytes sent both ways go to
bench/federated-cifar10-jpeg-w16.csv (one row per run and round, replaced when measured again). A run keeps its
state in <state-dir>/<run>.pt after every round: started again, it goes on from its last round; a finished run is
skipped; `--collect` puts the rounds measured so far in the CSV without running anything; `--until 5` stops each
listed run after its round 5 (run them all to round 5 first, then on to 10). After each run, every run's accuracy
against rounds so far is drawn in results/<the CSV's name>.png. `--quick` runs the digits guard instead (3 parties,
2 rounds, each strategy; the App's defaults).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from harness import CIFAR10, CIFAR100, HERE, Table, common_options

from otfuse.errors import OtfuseError, run_main
from otfuse.federated import Settings, resumed, simulate
from otfuse.plots import Look, federated_figure, save_figure

CLIENTS = 4
BASE = Settings(
    dataset=CIFAR10,
    width=16,
    rounds=10,
    local_epochs=3,
    batch_size=256,  # otfuse train's recipe for the parties of bench/bench_parties.py
    lr=0.2,
    fusion_data=f"public:{CIFAR100}",
    min_clients=CLIENTS,
    fusion_rounds=0,  # fused in every round, as the rows were measured; the -then-* runs fuse in round 1 only
    after_fusion="fedavg",  # as the -then-fedavg rows were measured; the -then-fedprox runs set fedprox
)
RUNS = {
    f"dir{alpha:g}-{strategy}": replace(BASE, alpha=alpha, strategy=strategy)
    for alpha in (0.5, 0.1)
    for strategy in ("otfusion", "fedavg", "fedprox")
}
RUNS.update({f"dir{alpha:g}-otfusion-global": replace(BASE, alpha=alpha, anchor="global") for alpha in (0.5, 0.1)})
# the clients' peak lr a quarter of the recipe's: clients trained from a fused model at 0.2 diverged (docs/federated.md)
RUNS.update(
    {f"dir{alpha:g}-{s}-lr0.05": replace(BASE, alpha=alpha, strategy=s, lr=0.05) for alpha in (0.5, 0.1) for s in ("otfusion", "fedavg")}
)
# fused in round 1 only, FedAvg's average after: the later fusions of clients from one fused start lost (docs/federated.md)
RUNS.update({f"dir{alpha:g}-otfusion-then-fedavg-lr0.05": replace(BASE, alpha=alpha, lr=0.05, fusion_rounds=1) for alpha in (0.5, 0.1)})
RUNS.update({f"dir{alpha:g}-otfusion-then-fedavg": replace(BASE, alpha=alpha, fusion_rounds=1) for alpha in (0.5, 0.1)})
# FedProx's clients after the fused round: FedProx led FedAvg after round 5 at alpha 0.5 (docs/federated.md)
RUNS.update(
    {f"dir{alpha:g}-otfusion-then-fedprox": replace(BASE, alpha=alpha, fusion_rounds=1, after_fusion="fedprox") for alpha in (0.5, 0.1)}
)
RUNS.update(
    {
        f"dir{alpha:g}-oneshot-{s}": replace(BASE, alpha=alpha, strategy=s, rounds=1, local_epochs=30)
        for alpha in (0.5, 0.1)
        for s in ("otfusion", "fedavg")
    }
)
DIGITS = Settings(width=8, rounds=2, local_epochs=3, min_clients=3, fusion_rounds=0)  # the digits guard, as its rows were measured
QUICK = {f"digits-{s}": replace(DIGITS, strategy=s) for s in ("otfusion", "fedavg", "fedprox")}
QUICK["digits-otfusion-global"] = replace(DIGITS, anchor="global")
KEY = ("run", "round")
STRATEGY_LOOKS = {"otfusion": Look("C0", "-"), "fedavg": Look("C3", "--"), "fedprox": Look("C1", ":")}
OTHER_LR_LOOKS = {"otfusion": Look("C2", "-"), "fedavg": Look("C5", "-."), "fedprox": Look("C8", ":")}


def look(settings: Settings) -> Look:
    """A run's line in the rounds figure: the strategy's colour and line (another colour at another local lr than
    the recipe's), fused-then-averaged runs their own colour (FedProx's clients after: another), anchored runs
    faint, otfuse's runs bold, its clients as a band under its every-round run at the recipe's lr."""
    base = (STRATEGY_LOOKS if settings.lr == BASE.lr else OTHER_LR_LOOKS)[settings.strategy]
    if settings.strategy == "otfusion" and settings.fusion_rounds:
        base = Look("C9" if settings.after_fusion == "fedprox" else "C4" if settings.lr == BASE.lr else "C6", "-")
    fused, anchored = settings.strategy == "otfusion", settings.anchor != BASE.anchor
    band = fused and not settings.fusion_rounds and not anchored and settings.lr == BASE.lr
    one_shot = settings.rounds == 1
    note = f"{settings.local_epochs} local epochs, sent once" if one_shot else ""
    return replace(base, main=fused and not anchored, band=band, faint=anchored, one_shot=one_shot, note=note)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--quick", action="store_true", help="the digits guard (3 parties, 2 rounds) instead")
    p.add_argument("--state-dir", default="checkpoint/federated", help="each run's rounds done, to resume")
    common_options(p, out_dir=False)
    p.add_argument("--out", default="", help="the CSV (default: bench/federated-<dataset>-w<width>.csv)")
    p.add_argument("--collect", action="store_true", help="run nothing: put the rounds each run's state holds so far in the CSV")
    p.add_argument("--until", type=int, default=0, help="stop each run after this round (0: its last, 10)")
    p.add_argument("--results-dir", default="results", help="where the accuracy-against-rounds figure goes (default: results/)")
    args = p.parse_args(argv)
    runs = QUICK if args.quick else {name: RUNS[name] for name in _names(args.runs)}
    clients = 3 if args.quick else CLIENTS
    table = Table(Path(args.out or HERE / ("federated-digits-w8.csv" if args.quick else "federated-cifar10-jpeg-w16.csv")), KEY)
    what = "digits, width 8, 3 parties" if args.quick else "CIFAR-10 (JPEG copy), ResNet18 width 16, K = 4 parties from one start"
    what += ", 3 local epochs a round"
    for name, settings in runs.items():
        _run(name, settings, args, clients, table)
        if table.rows:  # after every run: the figure of what is measured so far
            looks = {n: look(s) for n, s in {**RUNS, **QUICK}.items()}
            figure = federated_figure(table.rows, f"Federated rounds on {what}: server test accuracy", looks)
            print(f"wrote {save_figure(figure, Path(args.results_dir) / f'{table.path.stem}.png')}")
    return 0


def _run(name: str, settings: Settings, args: argparse.Namespace, clients: int, table: Table) -> None:
    """One run: skipped when its rows are all in `table`, its rounds so far put there with --collect, else run on."""
    if args.until > 0:
        settings = replace(settings, rounds=min(settings.rounds, args.until))
    if sum(r["run"] == name for r in table.rows) >= settings.rounds + 1:
        print(f"{name}: done (rows in {table.path})")
        return
    state = Path(args.state_dir) / f"{name}.pt"
    if args.collect:
        done, _, rows = resumed(str(state))
        rows = list({int(r["round"]): r for r in rows}.values())  # a round recorded twice (a resumed start): its last
        table.put(*({"run": name, "clients": clients, "alpha": settings.alpha, **r} for r in rows))
        print(f"{name}: {done} of {settings.rounds} rounds so far")
        return
    state.parent.mkdir(parents=True, exist_ok=True)
    run = replace(settings, state=str(state), data_dir=args.data_dir or "", device=args.device)
    rows = simulate(run, clients)
    table.put(*({"run": name, "clients": clients, "alpha": settings.alpha, **r} for r in rows))
    print(f"{name}: " + ", ".join(f"round {r['round']} {r['test_acc']}" for r in rows), flush=True)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise OtfuseError(f"--runs {', '.join(unknown)}: use some of {', '.join(RUNS)}")
    return names


if __name__ == "__main__":
    sys.exit(run_main(lambda: main(sys.argv[1:])))
