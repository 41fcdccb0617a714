"""Numeric precision of forward and backward passes: bf16 autocast where the hardware computes it natively.

    prec = resolve_precision("auto", device)   # Precision.BF16 on CUDA with bf16 and on CPUs with avx512_bf16/amx; else FP32
    with autocast(prec, device):
        y = model(channels_last(x, prec))

A command resolves the precision once, where it starts (the option's name and the device together), and passes
the resolved `Precision` on: every function that runs a forward pass requires one, so none can fall back to
float32 without a word.

`auto` is the default of every command: bf16 autocast (matmuls and convolutions in bfloat16,
with float32 accumulation; BatchNorm running statistics, losses, OT costs and the refit's Gram
matrices and solves stay in float32 or float64) where it is native, float32 elsewhere, where
emulated bf16 would be slower than float32. Under bf16, 4-D activations use the channels_last
layout, which the bf16 kernels run fastest on.

Float32 means float32 on every device: on Ampere and later GPUs cuDNN computes float32 convolutions in
TF32 (10-bit mantissa) unless told otherwise, so every fp32 forward pass, the alignment, the exactness
check and evaluation run inside `full_float32()`, which turns TF32 off and restores the settings after.
"""

from __future__ import annotations

import enum
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from otfuse.errors import OtfuseError

PRECISIONS = ("auto", "fp32", "bf16")


class Precision(str, enum.Enum):
    """A resolved precision: what forward passes run in. Compares equal to its name ("fp32", "bf16"), prints as it."""

    FP32 = "fp32"
    BF16 = "bf16"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:  # equal to its name, so hashed as it: ("row", Precision.BF16) finds ("row", "bf16")
        return hash(self.value)


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # x86 flags of native bf16 dot products


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") or line.startswith("Features"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware (not emulated)."""
    if device.type == "cuda":  # emulated bf16 (before Ampere) is slower than float32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_flags() & BF16_FLAGS)
    return False


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`auto` -> BF16 where native on `device`, else FP32; `fp32` and `bf16` as given; anything else one clear error."""
    if name not in PRECISIONS:
        raise OtfuseError(f"--precision {name!r} is unknown; choose {', '.join(PRECISIONS)}")
    if name == "auto":
        return Precision.BF16 if native_bf16(device) else Precision.FP32
    return Precision(name)


def autocast(precision: Precision, device: torch.device):
    """A context in which forward passes on `device` run in `precision` (resolved: fp32 or bf16, TF32 off under fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return full_float32()


def fp32_backends() -> tuple:
    """The backends whose float32 arithmetic may be rounded to a narrower type (TF32 on CUDA, bf16 in oneDNN)."""
    b = torch.backends
    return (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn, b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn.rnn)


_FULL_FLOAT32_LOCK = threading.Lock()
_full_float32_state: dict = {"depth": 0, "saved": []}


@contextmanager
def full_float32() -> Iterator[None]:
    """Float32 matmuls and convolutions computed in float32 ("ieee") while the block runs, whatever the process
    set; the previous settings come back when the last block still open ends. The settings are process-wide, and
    the refit enters blocks from several threads at once: a count kept under a lock makes the first entry save them
    and the last exit restore them (one thread's exit must not hand TF32 back to another still inside). Only the
    per-backend API is used: torch refuses to read flags that the legacy `allow_tf32` and `fp32_precision` set
    inconsistently."""
    state = _full_float32_state
    with _FULL_FLOAT32_LOCK:
        if state["depth"] == 0:
            state["saved"] = [b.fp32_precision for b in fp32_backends()]
            for b in fp32_backends():
                b.fp32_precision = "ieee"
        state["depth"] += 1
    try:
        yield
    finally:
        with _FULL_FLOAT32_LOCK:
            state["depth"] -= 1
            if state["depth"] == 0:
                for b, s in zip(fp32_backends(), state["saved"]):
                    b.fp32_precision = s


def memory_format(precision: Precision) -> torch.memory_format:
    return torch.channels_last if precision == "bf16" else torch.contiguous_format


def channels_last(x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """A 4-D batch in the layout `precision` runs fastest on (channels_last under bf16); other tensors as they are."""
    return x.contiguous(memory_format=torch.channels_last) if precision == "bf16" and x.ndim == 4 else x
