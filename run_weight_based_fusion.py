#!/usr/bin/env python
"""Fuse every pair of trained seeds under checkpoint/ with weight-based OT; writes results/.

python run_weight_based_fusion.py [--dataset cifar10] [--method weight-matching] [--device cuda]
"""

import sys

from otfuse.sweep import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], "weight"))
