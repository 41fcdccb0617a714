"""otfuse: fuse independently trained CNNs by optimal-transport channel alignment.

Channel groups that must move together are found by Torch-Pruning's DepGraph
(`channel_groups`), every model is aligned onto the first per group, the aligned weights are
averaged, BatchNorm statistics recomputed, and each layer refit to the parents' mean output.

    >>> import torch
    >>> from otfuse import FuseConfig, build_model, channel_groups, fuse, permute, random_maps
    >>> torch.manual_seed(0) and None
    >>> model = build_model("resnet18", width=4, in_channels=3, num_classes=10).eval()
    >>> images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    >>> norm = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    >>> groups = channel_groups(model, torch.randn(1, 3, 16, 16))
    >>> copy = permute(model, groups, random_maps(groups, seed=1))   # the same function, channels shuffled
    >>> cfg = FuseConfig()
    >>> cfg.align.n_images, cfg.bn.batches, cfg.refit.enabled = 64, 4, False
    >>> result = fuse([model, copy], images, norm, cfg)
    >>> all(torch.allclose(a, b, atol=1e-6) for a, b in zip(result.fused_no_bn.state_dict().values(), model.state_dict().values()))
    True
    >>> sorted(result.seconds)
    ['alignment', 'averaging', 'batchnorm', 'groups']

The names below are imported on first use (PEP 562), so that `import otfuse` and the `otfuse`
command start without loading PyTorch before they can answer Ctrl-C. `otfuse.fuse` is the
pipeline function, defined in the module `otfuse.fusion`.
"""

from __future__ import annotations

import importlib

from otfuse.version import __version__

_EXPORTS = {
    "fuse": "otfuse.fusion",
    "FuseConfig": "otfuse.fusion",
    "Fusion": "otfuse.fusion",
    "AlignConfig": "otfuse.align",
    "register_method": "otfuse.align",
    "METHODS": "otfuse.align",
    "channel_groups": "otfuse.grouping.exact",
    "ChannelMap": "otfuse.maps",
    "carry": "otfuse.maps",
    "permute": "otfuse.maps",
    "random_maps": "otfuse.maps",
    "transport_map": "otfuse.maps",
    "build_model": "otfuse.models",
    "load_checkpoint": "otfuse.checkpoints",
    "save_checkpoint": "otfuse.checkpoints",
    "fusion_table": "otfuse.report",
    "OtfuseError": "otfuse.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'otfuse' has no attribute {name!r}")
