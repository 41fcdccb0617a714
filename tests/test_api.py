"""The public API: `from otfuse import ...` and the usage example in the package docstring, run as a doctest."""

import doctest
import subprocess
import sys

import pytest

import otfuse


def test_the_package_docstring_runs():
    failures, tried = doctest.testmod(otfuse, verbose=False)
    assert tried > 5 and failures == 0


def test_the_public_names_are_the_objects_of_their_modules():
    import otfuse.align
    import otfuse.fusion
    import otfuse.maps

    assert otfuse.fuse is otfuse.fusion.fuse and callable(otfuse.fuse)  # the function, after its module was imported
    assert otfuse.FuseConfig is otfuse.fusion.FuseConfig and otfuse.permute is otfuse.maps.permute
    assert set(otfuse.METHODS) >= {"activation", "weight", "weight-matching"} and otfuse.METHODS is otfuse.align.METHODS
    assert sorted(otfuse.__all__) == sorted(
        {
            "__version__",
            "fuse",
            "FuseConfig",
            "Fusion",
            "AlignConfig",
            "register_method",
            "METHODS",
            "channel_groups",
            "ChannelMap",
            "carry",
            "permute",
            "random_maps",
            "transport_map",
            "build_model",
            "load_checkpoint",
            "save_checkpoint",
            "fusion_table",
            "OtfuseError",
        }
    )
    with pytest.raises(AttributeError, match="no attribute 'fusee'"):
        _ = otfuse.fusee


def test_importing_the_package_does_not_load_torch():
    """The `otfuse` command answers --help and Ctrl-C before PyTorch's seconds of import."""
    code = "import sys, otfuse; print('torch' in sys.modules, otfuse.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and out[1].count(".") == 2
