"""Numeric precision of the forward passes: fp32, bf16 autocast, or `auto` (bf16 where the hardware
runs it natively).

bf16 autocast is the usual GPU setting; many CPUs run it natively too (AVX512-BF16 or AMX through
oneDNN), where it makes the default study's training step ~1.75x faster than fp32. Where a CPU
lacks those instructions bf16 is emulated and slower than fp32, so `auto` keeps fp32 there. The
precision a run actually used is recorded with it (`effective_precision`), because it is part of
what produced the numbers.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` runs bf16 convolutions and matmuls natively (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def effective_precision(precision: str, device: torch.device | str) -> str:
    """`fp32` or `bf16`: what `precision` (fp32 | bf16 | auto) means on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast_factory(precision: str, device: torch.device | str) -> Callable[[], Any]:
    """A zero-argument context-manager factory: bf16 autocast on `device`, or a no-op for fp32."""
    device = torch.device(device)
    if effective_precision(precision, device) == "bf16":
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
