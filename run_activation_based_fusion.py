#!/usr/bin/env python
"""Fuse every pair of trained seeds under checkpoint/ with activation-based OT; writes results/.

python run_activation_based_fusion.py [--dataset cifar10] [--pairs 0-1] [--n-images 1000] [--device cuda]
"""

import sys

from otfuse.sweep import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], "activation"))
