"""A bounded in-memory cache of decoded patches for the training loader.

A training run reads every patch of its split many times (300 steps x 32 patches of 1,344 on
the embedded cohort: each patch about seven times); decoding the TIFF again costs about a third
of the loader's time there. The cache keeps decoded float images up to `max_bytes`, least
recently used out first, so a small cohort is decoded once and a large one (OpenSRH) costs only
the bookkeeping. Each DataLoader worker holds its own cache; hits return a copy, so a transform
that worked in place could never change a later read.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class DecodedImageCache:
    """`cache(path)` = `read(path)`, remembered while the stored tensors fit in `max_bytes`."""

    def __init__(self, read: Callable[[str], torch.Tensor], max_bytes: int):
        self.read = read
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = self.misses = 0
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, path: str) -> torch.Tensor:
        image = self._store.get(path)
        if image is not None:
            self._store.move_to_end(path)
            self.hits += 1
            return image.clone()
        self.misses += 1
        image = self.read(path)
        size = image.element_size() * image.nelement()
        if 0 < size <= self.max_bytes:
            while self._store and self.nbytes + size > self.max_bytes:
                _, old = self._store.popitem(last=False)
                self.nbytes -= old.element_size() * old.nelement()
            self._store[path] = image.clone()
            self.nbytes += size
        return image

    def __len__(self) -> int:
        return len(self._store)
