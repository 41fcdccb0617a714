"""Precision: `auto` follows the hardware, bf16 runs really run in bf16, and what needs float32 stays float32."""

from __future__ import annotations

import pytest
import torch

import otfuse.precision as P
from conftest import config
from otfuse.errors import OtfuseError
from otfuse.evaluate import accuracy, logits
from otfuse.fusion import fuse


def test_auto_resolves_to_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert P.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert P.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert P.resolve_precision("auto", cpu) == "bf16"
    assert P.resolve_precision("fp32", cpu) == "fp32" and P.resolve_precision("bf16", cpu) == "bf16"


def test_an_unknown_precision_is_one_clear_error():
    with pytest.raises(OtfuseError, match="--precision 'fp16' is unknown; choose auto, fp32, bf16"):
        P.resolve_precision("fp16", torch.device("cpu"))


def test_bf16_evaluation_runs_in_bf16_and_agrees_with_fp32(trained):
    models, data, _, _ = trained
    z32 = logits(models[0], data.test_x, data.norm, precision="fp32")
    z16 = logits(models[0], data.test_x, data.norm, precision="bf16")
    assert z16.dtype == torch.float32 and not torch.equal(z32, z16)  # bf16 rounding shows in the logits
    assert (z32 - z16).abs().max() < 0.05 * z32.abs().max()
    assert abs(accuracy(models[0], data.test_x, data.test_y, data.norm, "fp32")
               - accuracy(models[0], data.test_x, data.test_y, data.norm, "bf16")) <= 1.0


def test_a_bf16_fusion_matches_the_fp32_one(trained):
    """bf16 moves only the forward passes: the fused model is the fp32 one up to rounding, and BatchNorm's
    statistics stay float32 buffers."""
    models, data, _, _ = trained
    results = {p: fuse(models, data.train_x, data.norm, config(precision=p, bn_batches=4, n_images=200, refit_n_images=200))
               for p in ("fp32", "bf16")}
    assert results["bf16"].precision == "bf16" and results["fp32"].precision == "fp32"
    a, b = (r.fused.state_dict() for r in results.values())
    assert all(b[k].dtype == a[k].dtype for k in a) and b["bn1.running_var"].dtype == torch.float32
    accs = {p: accuracy(r.fused, data.test_x, data.test_y, data.norm, "fp32") for p, r in results.items()}
    assert abs(accs["fp32"] - accs["bf16"]) <= 1.5, accs
