#!/usr/bin/env python
"""Throughput and phase seconds on this machine: what `--precision` buys, and where a fusion's time goes.

    python bench/bench_speed.py                                   # throughput rows (random weights and images)
    python bench/bench_speed.py --parents A.pt B.pt               # + one default fusion of A and B per precision
    python bench/bench_speed.py --parents A.pt B.pt --table       # + the whole w64 table (bench_scale.py --methods activation)
    python bench/bench_speed.py --parties 2,4,8 --widths 16       # + one fusion of K random-weight models: seconds, memory

Rows go to bench/speed-<machine>.csv (machine: e.g. `cpu2-avx512_bf16`, `cuda-nvidia-h200`) as each
finishes; a rerun skips the rows already there, so a stopped run resumes. Columns: `what`
(inference, training, fusion, fusion:<phase>, table), `width`, `precision`, `value` and `unit`
(img/s or s). Inference: batches of 250 32x32 RGB images, no gradients; training: SGD steps of
128 images (forward, backward, update). Each throughput is the best of a few timed repetitions
after a warm-up, so other work on the machine lowers it less. With --parties, one default fusion of K
random-weight ResNet18s per K and width on 5,000 random images, each in a process of its own (`fusion-k<K>`, s),
and the resident memory the fusion added at its peak (`fusion-k<K>-memory`, MiB: the process's peak less its size
before): time and memory against K.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from harness import Table, common_options
from torch import nn

from otfuse.checkpoints import pick_device
from otfuse.errors import run_main
from otfuse.fusion import FuseConfig, fuse
from otfuse.inputs import fusion_inputs
from otfuse.models import build_model
from otfuse.precision import autocast, channels_last, cpu_flags, memory_format, resolve_precision

FIELDS = ["what", "width", "precision", "value", "unit", "machine", "torch", "threads"]
INFER_BATCH, TRAIN_BATCH = 250, 128  # images
PARTY_IMAGES = 5000  # random 32x32 images the K-party fusions read
REPEATS = 3  # timed repetitions per throughput; the best counts


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    bf16 = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return f"cpu{torch.get_num_threads()}-" + ("-".join(bf16) if bf16 else "no-bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(width: int, precision: str, training: bool, device: torch.device, steps: int) -> float:
    """Images per second of inference or training steps of a width-`width` ResNet18 on 32x32 images."""
    torch.manual_seed(0)
    model = build_model("resnet18", width, 3, 10).to(device, memory_format=memory_format(precision))
    n = TRAIN_BATCH if training else INFER_BATCH
    x = channels_last(torch.randn(n, 3, 32, 32, device=device), precision)
    y = torch.randint(0, 10, (n,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        if training:
            with autocast(precision, device):
                loss = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast(precision, device):
                model(x)

    model.train(training)
    step()  # warm-up: kernel selection, allocations
    best = float("inf")
    for _ in range(REPEATS):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return steps * n / best


def parties_fusion(k: int, width: int, device: str) -> tuple[float, float]:
    """Seconds and peak added resident MiB of one default fusion of `k` random-weight width-`width` ResNet18s, in a
    process of its own (a process's peak counts everything it ever held)."""
    cmd = [sys.executable, __file__, "--one-fusion", f"{k},{width}", "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), float(out[-1])


def _one_fusion(k: int, width: int, device: torch.device) -> None:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model("resnet18", width, 3, 10).to(device).eval())
    images = torch.randint(0, 256, (PARTY_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)
    with open("/proc/self/statm") as f:  # Linux: resident pages, second field
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    fuse(models, images, ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), FuseConfig())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(f"{seconds:.2f} {(peak - before) / 2**20:.1f}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parents", nargs=2, default=None, metavar=("A.pt", "B.pt"), help="two checkpoints: time one default fusion")
    p.add_argument("--table", action="store_true", help="with --parents: also time the whole table (bench_scale.py --methods activation)")
    p.add_argument("--widths", default="16,64")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=4, help="steps per timed repetition")
    p.add_argument("--parties", default="", help="comma-separated K: one fusion of K random-weight models per K and width")
    p.add_argument("--one-fusion", default="", help=argparse.SUPPRESS)  # "K,width": --parties' own child process
    common_options(p)
    args = p.parse_args(argv)
    if args.one_fusion:
        k, width = map(int, args.one_fusion.split(","))
        _one_fusion(k, width, pick_device(args.device))
        return 0

    def run() -> int:
        device = pick_device(args.device)
        machine = machine_name(device)
        table = Table(Path(args.out_dir) / f"speed-{machine}.csv", ("what", "width", "precision"), FIELDS)
        precisions = [resolve_precision(q, device) for q in args.precisions.split(",") if q]

        def record(what: str, width: int, precision: str, value: float, unit: str) -> None:
            table.put(
                {
                    "what": what,
                    "width": width,
                    "precision": precision,
                    "value": f"{value:.1f}",
                    "unit": unit,
                    "machine": machine,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                }
            )
            print(f"{what:<20} w{width:<3} {precision:<5} {value:9.1f} {unit}", flush=True)

        def todo(what: str, width: int, precision: str) -> bool:
            return not table.has(what=what, width=width, precision=precision)

        for width in (int(w) for w in args.widths.split(",") if w):
            for precision in precisions:
                for what, training in (("inference", False), ("training", True)):
                    if todo(what, width, precision):
                        record(what, width, precision, throughput(width, precision, training, device, args.steps), "img/s")
        for width in (int(w) for w in args.widths.split(",") if w and args.parties):
            for k in (int(k) for k in args.parties.split(",") if k):
                if todo(f"fusion-k{k}", width, "auto"):
                    seconds, mib = parties_fusion(k, width, args.device)
                    record(f"fusion-k{k}-memory", width, "auto", mib, "MiB")
                    record(f"fusion-k{k}", width, "auto", seconds, "s")
        if args.parents:
            inputs = fusion_inputs(args.parents, data_dir=args.data_dir, device=args.device, same_width=True)
            models, data, width = inputs.models, inputs.data, inputs.width
            for precision in precisions:
                if todo("fusion", width, precision):
                    cfg = replace(inputs.cfg, precision=precision)
                    t0 = time.perf_counter()
                    fusion = fuse(models, data.train_x, data.norm, cfg)
                    total = time.perf_counter() - t0
                    for phase, seconds in fusion.seconds.items():
                        record(f"fusion:{phase}", width, precision, seconds, "s")
                    record("fusion", width, precision, total, "s")
            for precision in precisions if args.table else []:
                if todo("table", width, precision):
                    t0 = time.perf_counter()
                    subprocess.run(
                        [
                            sys.executable,
                            str(Path(__file__).parent / "bench_scale.py"),
                            *args.parents,
                            "--methods",
                            "activation",
                            "--base",
                            f"precision={precision}",
                            "--out-dir",
                            args.out_dir,
                        ]
                        + (["--data-dir", args.data_dir] if args.data_dir else []),
                        check=True,
                    )
                    record("table", width, precision, time.perf_counter() - t0, "s")
        print(f"wrote {table.path}")
        return 0

    return run_main(run)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
