"""Batches that halve on a CUDA out-of-memory error and go on, instead of ending the job.

An input-gradient pass keeps every activation of its batch: at 300 px a batch the evaluation's
`batch_size` allows on one model or card may not fit on another. `HalvingBatches` runs a batched
computation in pieces of at most `limit` rows (at first: the whole batch), halves `limit` when a
piece runs out of memory, retries that piece and keeps the smaller size for later batches. The
pieces are concatenated, so a computation whose rows are independent gives the same result at any
piece size (the caller draws any randomness for the whole batch first and slices it).
"""

from __future__ import annotations

import gc
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is the allocator's out-of-memory error (torch.OutOfMemoryError, CUDA's included)."""
    return isinstance(exc, torch.OutOfMemoryError)


def free_cached_memory() -> None:
    """After an out-of-memory error: drop unreachable tensors and return the allocator's cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HalvingBatches:
    """Call as `halving(fn, n)`: `fn(slice)` over rows [0, n) in pieces, halved on out of memory."""

    def __init__(self, what: str = "batch", limit: int | None = None):
        self.what = what
        self.limit = limit  # None: the whole batch at once

    def __call__(self, fn: Callable[[slice], torch.Tensor], n: int) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        start = 0
        while start < n:
            size = n - start if self.limit is None else min(self.limit, n - start)
            try:
                parts.append(fn(slice(start, start + size)))
            except Exception as exc:
                if not is_out_of_memory(exc) or size == 1:
                    raise
                failed = True
            else:
                failed = False
            if failed:  # outside the except block: its traceback no longer holds the piece's tensors
                self.limit = size // 2
                log.warning("%s: out of memory at %d rows; going on in pieces of %d", self.what, size, self.limit)
                free_cached_memory()
                continue
            start += size
        return parts[0] if len(parts) == 1 else torch.cat(parts)
