#!/usr/bin/env python
"""Seconds to find the channel groups of a width-64 CIFAR ResNet18 and to permute them (target: < 0.5 s together).

python bench/bench_groups.py [--width 64] [--repeat 5]
"""

import argparse
import time

import torch

from otfuse import channel_groups, permute, random_maps
from otfuse.models import build_model


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet18", args.width, 3, 10).eval()
    x = torch.randn(1, 3, 32, 32)
    t_groups, groups = best_of(lambda: channel_groups(model, x), args.repeat)
    perms = random_maps(groups)
    t_perm, _ = best_of(lambda: permute(model, groups, perms), args.repeat)
    print(
        f"resnet18 w{args.width}: {len(groups)} groups; channel_groups {t_groups:.3f} s, permute {t_perm:.3f} s, "
        f"together {t_groups + t_perm:.3f} s (target < 0.5 s; {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
