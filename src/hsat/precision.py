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
from typing import Any, Callable, Iterator

import torch

from hsat.errors import HSATError

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` runs bf16 convolutions and matmuls natively (not emulated).

    On a GPU, `torch.cuda.is_bf16_supported()` also says yes where bf16 is only emulated (before
    Ampere, compute capability < 8.0: slower than fp32), so emulation is excluded."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
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


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions really in fp32 inside the block: TF32 off for cuBLAS and cuDNN
    (PyTorch lets cuDNN convolutions use TF32 by default, 10 mantissa bits on Ampere and later),
    the previous flags restored after. For crafting attacks, whose gradient signs near zero
    TF32 can flip, so that "fp32 crafting" means the same on a GPU as on a CPU. No effect on
    a CPU, nor on ops autocast runs in bf16."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def autocast_factory(precision: str, device: torch.device | str) -> Callable[[], Any]:
    """A zero-argument context-manager factory: bf16 autocast on `device`, or a no-op for fp32."""
    device = torch.device(device)
    if effective_precision(precision, device) == "bf16":
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def strided_convs_on_single_pixels(model: torch.nn.Module, image_sizes: tuple[int, ...],
                                   channels: int = 3) -> list[str]:
    """Convolutions with stride > 1 whose input is 1 x 1 pixel at one of `image_sizes` (a dry
    forward per size, on the CPU, hooks only).

    oneDNN's bf16 weight gradient of such a convolution is garbage on this project's CPUs
    (NaN or ~1e36 at random: uninitialised memory; fp32 is right), which is what made DINO on
    resnet10t diverge with 16 px local crops (its layer4 sees 1 x 1 there). Larger inputs are
    fine, so only these shapes make bf16 unsafe.
    """
    found: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and max(module.stride) > 1:
            def hook(mod, args, name=name):
                x = args[0]
                if x.dim() == 4 and x.shape[-1] == 1 and x.shape[-2] == 1 and name not in found:
                    found.append(name)
            hooks.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            for size in sorted(set(int(s) for s in image_sizes)):
                model(torch.zeros(1, channels, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


def safe_precision(precision: str, requested: str, device: torch.device | str, model: torch.nn.Module,
                   image_sizes: tuple[int, ...]) -> tuple[str, list[str]]:
    """The precision to train in: `precision` (already resolved), unless it is bf16 on the CPU and a
    strided convolution sees a 1 x 1 input (`strided_convs_on_single_pixels`). Then `auto` falls
    back to fp32 (the caller warns) and an explicit `bf16` is refused: its weight gradients there
    are uninitialised memory, so whether the run diverges depends on what ran before it, not on the
    config. Returns (precision, the offending layers)."""
    if precision != "bf16" or torch.device(device).type != "cpu":
        return precision, []
    bad = strided_convs_on_single_pixels(model, image_sizes)
    if bad and requested != "auto":
        sizes = "/".join(str(s) for s in sorted(set(int(s) for s in image_sizes)))
        raise HSATError(
            f"precision: bf16 on the CPU gives wrong weight gradients for {', '.join(bad[:3])} "
            f"(a strided convolution on a 1 x 1 input at {sizes} px); set precision: auto (falls back "
            "to fp32 for this model) or fp32, or use larger images or crops")
    if bad:
        return "fp32", bad
    return precision, bad
