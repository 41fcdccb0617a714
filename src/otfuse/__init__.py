"""otfuse: fuse independently trained CNNs by optimal-transport channel alignment.

Channel groups that must move together are found by Torch-Pruning's DepGraph
(`otfuse.groups`), model B is aligned onto model A per group (`otfuse.align`), the
aligned weights are averaged and BatchNorm statistics recomputed (`otfuse.fuse`).

    from otfuse.fuse import fuse_models
    fused, report = fuse_models([model_a, model_b], data, method="activation")
"""

__version__ = "0.1.0"
