"""torchrun support: process-group setup, gathering embeddings with gradients, SyncBatchNorm, DDP.

Conventions (the same as torch's own SyncBatchNorm and `torch.distributed.nn.all_gather`): every
rank computes the SAME global loss from the gathered batch; the backward of a gather sums the
gradients of all ranks, so each rank's parameter gradients are `world_size` times its share and
DDP's averaging turns them into the gradient of the global loss -- the same gradient one process
would compute on the whole batch.

Without torchrun (no RANK/WORLD_SIZE in the environment) everything here is a no-op on one device.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel as DDP

from hsat.errors import HSATError

__all__ = [
    "init_distributed",
    "is_distributed",
    "rank",
    "world_size",
    "gather_with_grad",
    "convert_sync_batchnorm",
    "wrap_ddp",
    "barrier",
    "cleanup",
    "resolve_device",
]


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is CUDA when available, else CPU; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HSATError("device: 'cuda' requested but torch sees no CUDA device (use device=auto or cpu)")
    return torch.device(name)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_distributed(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Returns `(rank, world_size, local_rank, device)`. Backend nccl on CUDA, gloo on CPU. Without
    those variables (a plain `hsat pretrain`) it returns `(0, 1, 0, device)` and starts nothing.
    Calling it again in an initialised process returns the existing group's values.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0, resolve_device(device)
    try:
        rank_ = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank_))
    except ValueError as exc:
        raise HSATError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise HSATError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    if world > 1 and not is_distributed():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            backend=backend, rank=rank_, world_size=world, timeout=datetime.timedelta(minutes=30), **kw
        )
    return rank_, world, local_rank, dev


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed() and world_size() > 1:
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward = sum of every rank's gradient, local slice kept."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # all_reduce works on gloo and nccl alike (reduce_scatter does not on gloo)
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()].contiguous()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks as well (every rank uses the result)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` (same shape on every rank) from all ranks along dim 0, keeping gradients.

    The backward sums the incoming gradients of all ranks and returns the local slice, which is
    right when every rank computes the same loss of the gathered tensor: see the module
    docstring. Identity in a single process.
    """
    if not is_distributed() or world_size() == 1:
        return t
    return _AllGatherWithGrad.apply(t.contiguous())


class GlooSyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch for CPU tensors (torch's SyncBatchNorm is GPU-only).

    Reduces per-channel count, sum and sum of squares across ranks with an autograd-aware
    all-reduce, so the forward equals one BatchNorm over the concatenated batch and the backward
    follows the same summed-gradient convention as `gather_with_grad`. Meant for the gloo tests and
    CPU clusters; on CUDA `convert_sync_batchnorm` uses torch's fused `nn.SyncBatchNorm`.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        x = input.float()
        local_n = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), local_n])
        stats = _AllReduceSum.apply(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Replace every BatchNorm layer by a synchronised one (torch's on GPU, GlooSyncBatchNorm on CPU).

    Parameter and buffer names are unchanged, so state dicts load into the plain model.
    """
    if torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when running under torchrun with >1 process."""
    if not is_distributed() or world_size() == 1:
        return model

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)

