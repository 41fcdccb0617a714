"""Precision: `auto` follows the hardware, bf16 runs really run in bf16, and what needs float32 stays float32."""

from __future__ import annotations

import pytest
import torch

import otfuse.precision as P
from otfuse.errors import OtfuseError
from otfuse.evaluate import accuracy, logits
from otfuse.fusion import fuse
from otfuse.precision import Precision

from support import config


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
    z32 = logits(models[0], data.test_x, data.norm, precision=Precision.FP32)
    z16 = logits(models[0], data.test_x, data.norm, precision=Precision.BF16)
    assert z16.dtype == torch.float32 and not torch.equal(z32, z16)  # bf16 rounding shows in the logits
    assert (z32 - z16).abs().max() < 0.05 * z32.abs().max()
    assert (
        abs(
            accuracy(models[0], data.test_x, data.test_y, data.norm, Precision.FP32)
            - accuracy(models[0], data.test_x, data.test_y, data.norm, Precision.BF16)
        )
        <= 1.0
    )


def test_a_bf16_fusion_matches_the_fp32_one(trained):
    """bf16 moves only the forward passes: the fused model is the fp32 one up to rounding, and BatchNorm's
    statistics stay float32 buffers."""
    models, data, _, _ = trained
    results = {
        p: fuse(models, data.train_x, data.norm, config(precision=p, bn_batches=4, n_images=200, refit_n_images=200))
        for p in ("fp32", "bf16")
    }
    assert results["bf16"].precision == "bf16" and results["fp32"].precision == "fp32"
    a, b = (r.fused.state_dict() for r in results.values())
    assert all(b[k].dtype == a[k].dtype for k in a) and b["bn1.running_var"].dtype == torch.float32
    accs = {p: accuracy(r.fused, data.test_x, data.test_y, data.norm, Precision.FP32) for p, r in results.items()}
    assert abs(accs["fp32"] - accs["bf16"]) <= 1.5, accs


@pytest.fixture
def forward_precisions(monkeypatch):
    """Records, for every conv/linear forward pass, (the stage running, whether bf16 autocast was on): the stages are
    the library functions below, wrapped where fuse() and training call them. The structure probes (channel groups
    and their exactness check, the refit's list of units: one or two images each) are a stage of their own."""
    import otfuse.fusion
    import otfuse.refit
    import otfuse.train

    seen: list[tuple[str, bool]] = []
    stage = ["other"]

    def wrap(module, name: str):
        original = getattr(module, name)

        def staged(*args, **kwargs):
            before, stage[0] = stage[0], name
            try:
                return original(*args, **kwargs)
            finally:
                stage[0] = before

        monkeypatch.setattr(module, name, staged)

    for module, name in (
        (otfuse.fusion, "recompute_bn"),
        (otfuse.fusion, "refit"),
        (otfuse.fusion, "repair"),
        (otfuse.fusion, "to_target_maps"),
        (otfuse.fusion, "align"),
        (otfuse.train, "accuracy"),
        (otfuse.train, "logits"),
        (otfuse.fusion, "groups_of"),
        (otfuse.fusion, "refit_sets_every_batchnorm"),
        (otfuse.refit, "units"),
        (otfuse.train, "_check_takes"),
    ):
        wrap(module, name)

    def hook(m, args):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            seen.append((stage[0], bf16))
            flags.append((stage[0], bf16, tuple(b.fp32_precision for b in P.fp32_backends())))

    flags: list[tuple[str, bool, tuple[str, ...]]] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    # what a GPU process starts with: cuDNN convolutions in TF32 (and here matmuls too, as a user may set them)
    saved = [b.fp32_precision for b in P.fp32_backends()]
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
    yield seen, flags
    assert torch.backends.cudnn.conv.fp32_precision == torch.backends.cuda.matmul.fp32_precision == "tf32", "settings not restored"
    for b, s in zip(P.fp32_backends(), saved):
        b.fp32_precision = s
    handle.remove()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_forward_pass_runs_in_the_resolved_precision(trained, tmp_path, forward_precisions, precision):
    """BatchNorm recomputation, REPAIR, the refit, evaluation and training run every forward pass in the precision
    resolved where the command started; only the alignment reads float32 activations whatever it is (by design), and
    the structure probes run in float32."""
    from otfuse.report import table
    from otfuse.train import TrainConfig, train

    models, data, _, root = trained
    want = precision == "bf16"
    fusion = fuse(models, data.train_x, data.norm, config(precision=precision, bn_batches=2, n_images=100, refit_n_images=100, repair=True))
    table(fusion, data, "val")
    train(
        TrainConfig(
            dataset="digits",
            width=4,
            epochs=1,
            batch_size=64,
            seed=0,
            device="cpu",
            precision=precision,
            data_dir=str(root / "data"),
            out=str(tmp_path / "m.pt"),
        ),
        progress=False,
    )
    forward_precisions, flags = forward_precisions
    stages = {s for s, _ in forward_precisions}
    assert {"recompute_bn", "refit", "repair", "align", "accuracy", "logits", "other"} <= stages
    probes = ("align", "to_target_maps", "groups_of", "refit_sets_every_batchnorm", "units", "_check_takes")
    wrong = {s for s, bf16 in forward_precisions if bf16 != want and s not in probes}
    assert not wrong, f"forward passes in the wrong precision in {wrong}"
    assert not any(bf16 for s, bf16 in forward_precisions if s in probes)
    # float32 means float32: every pass outside bf16 autocast (the alignment and exactness check under either
    # precision, evaluation and training under fp32) runs with TF32 off, though the process turned it on
    float32 = [(s, f) for s, bf16, f in flags if not bf16]
    assert float32 and {"align", "groups_of"} <= {s for s, _ in float32}
    tf32 = {s for s, f in float32 if set(f) != {"ieee"}}
    assert not tf32, f"float32 forward passes with TF32 or bf16 allowed in {tf32}"


def test_full_float32_restores_the_settings_when_the_block_fails():
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    with pytest.raises(RuntimeError), P.full_float32():
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        raise RuntimeError("a stage failed")
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_full_float32_blocks_in_threads_leave_the_settings_as_they_found_them():
    """The refit runs forward passes in several threads at once: however their blocks interleave, none ends another's
    float32, and the process's own settings come back once the last one ends."""
    import threading

    torch.backends.cudnn.conv.fp32_precision = "tf32"
    inside, go = [], threading.Barrier(4)

    def worker():
        with P.full_float32():
            go.wait()
            inside.append(torch.backends.cudnn.conv.fp32_precision)
            go.wait()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inside == ["ieee"] * 4 and torch.backends.cudnn.conv.fp32_precision == "tf32"
