"""Hierarchical (patient -> slide -> patch -> view) sampling for pretraining, and a flat patch dataset.

HiDisc-style: one item is one patient, from which `S` slides, `K` patches per slide and `V`
augmented views per patch are drawn, giving images shaped (S, K, V, C, H, W); a batch stacks
`P` patients to (P, S, K, V, C, H, W). Positives at each level of the hierarchical loss follow
from the position in that tensor.

Reproducibility: an item is addressed by the key `(patient_index, step)`, and every random
choice it makes (slides, patches, augmentations) comes from a seed derived from
`(seed, step, patient_index)` alone, so the same key gives the same tensor in any worker
process, and a run resumed at step k sees exactly the data an uninterrupted run would have.
The batch sampler is likewise a pure function of `(seed, step)`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from hsat.data.cache import DecodedImageCache
from hsat.data.manifest import class_names, label_ids
from hsat.data.srh import read_image
from hsat.data.transforms import PatchTooSmall, eval_transform, local_transform, train_transform
from hsat.errors import HSATError

__all__ = [
    "HierarchicalDataset",
    "HierarchicalBatchSampler",
    "PatchDataset",
    "collate_hierarchical",
    "make_loader",
]

Key = tuple[int, int]  # (patient_index, step)


def _split_rows(manifest: pd.DataFrame, split: str | None, what: str) -> pd.DataFrame:
    missing = [c for c in ("patient", "slide", "path", "label") if c not in manifest.columns]
    if missing:
        raise HSATError(f"{what}: manifest lacks column(s) {missing}")
    if split is None:
        rows = manifest
    else:
        if "split" not in manifest.columns:
            raise HSATError(f"{what}: manifest has no 'split' column to select split={split!r}")
        rows = manifest[manifest["split"].astype(str) == split]
        if rows.empty:
            have = sorted(set(manifest["split"].astype(str)))
            raise HSATError(f"{what}: no rows with split={split!r} in the manifest (splits present: {have})")
    return rows.reset_index(drop=True)


def _classes_and_ids(manifest: pd.DataFrame, rows: pd.DataFrame, classes: Sequence[str] | None):
    """Class list (from the whole manifest, so ids agree across splits) and the rows' label ids."""
    classes = list(classes) if classes is not None else class_names(manifest)
    return classes, label_ids(rows, classes)


def _seed_for(*entropy: int) -> int:
    """A 63-bit seed mixing the given non-negative integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(e) % 2**64 for e in entropy]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _draw(n: int, k: int) -> Tensor:
    """`k` indices out of `n`: without replacement when there are enough, with replacement otherwise."""
    if n >= k:
        return torch.randperm(n)[:k]
    return torch.randint(n, (k,))


def _apply(transform: Callable[[Tensor], Tensor], image: Tensor, path: str) -> Tensor:
    """`transform(image)`, a too-small patch reported with its file (also from a DataLoader worker)."""
    try:
        return transform(image)
    except PatchTooSmall as exc:
        raise HSATError(f"{path}: {exc}") from None


def _key(key: Any) -> Key:
    if isinstance(key, (tuple, list)) and len(key) == 2:
        return int(key[0]), int(key[1])
    if isinstance(key, (int, np.integer)):
        return int(key), 0
    raise TypeError(f"key must be (patient_index, step) or an int, got {key!r}")


class HierarchicalDataset(Dataset):
    """One item = one patient: `{"images": (S, K, V, C, H, W), "label": int, "patient": str}`.

    Patients are the sorted unique `patient` ids of the rows of `split` (None = all rows).
    `strength_fn(step) -> float` gives the augmentation strength at a step (default 1.0);
    it must pickle into DataLoader workers, so pass a module-level function or
    `functools.partial(hsat.data.transforms.strength_at, total_steps=..., ...)`, not a lambda.
    Each patch is read once with `hsat.data.srh.read_image` and augmented `num_transforms` times
    by `train_transform` (`preset`, and `resize` / `allow_upscale` as `data.resize` /
    `data.allow_upscale` say; a patch too small for the crop raises HSATError naming its file).
    `cache_mb` > 0 keeps decoded patches in memory (`hsat.data.cache.DecodedImageCache`).
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        split: str | None = "train",
        num_slide_samples: int = 2,
        num_patch_samples: int = 2,
        num_transforms: int = 2,
        image_size: int = 32,
        prob: float = 0.3,
        strength_fn: Callable[[int], float] | None = None,
        seed: int = 0,
        classes: list[str] | None = None,
        preset: str = "srh",
        resize: dict[str, Any] | None = None,
        allow_upscale: bool = False,
        local_crops: Mapping[str, Any] | None = None,
        cache_mb: float = 0,
    ):
        for name, value in (
            ("num_slide_samples", num_slide_samples),
            ("num_patch_samples", num_patch_samples),
            ("num_transforms", num_transforms),
        ):
            if int(value) < 1:
                raise HSATError(f"data.{name} must be at least 1, got {value!r}")
        rows = _split_rows(manifest, split, "HierarchicalDataset")
        self.classes, ids = _classes_and_ids(manifest, rows, classes)
        rows = rows.assign(_label_id=ids)

        self.patients: list[str] = []
        self.labels: list[int] = []
        # slides[i] = list over that patient's slides of its patch paths (manifest order).
        self.slides: list[list[list[str]]] = []
        self.slide_ids: list[list[str]] = []
        for patient, prows in rows.groupby(rows["patient"].astype(str), sort=True):
            prow_labels = sorted(set(prows["_label_id"].tolist()))
            if len(prow_labels) != 1:
                names = [self.classes[i] for i in prow_labels]
                raise HSATError(f"HierarchicalDataset: patient {patient!r} has several labels {names}")
            groups = prows.groupby(prows["slide"].astype(str), sort=True)
            self.patients.append(patient)
            self.labels.append(int(prow_labels[0]))
            self.slide_ids.append([slide for slide, _ in groups])
            self.slides.append([[str(p) for p in g["path"]] for _, g in groups])

        self.num_slide_samples = int(num_slide_samples)
        self.num_patch_samples = int(num_patch_samples)
        self.num_transforms = int(num_transforms)
        self.image_size = int(image_size)
        self.prob = float(prob)
        self.strength_fn = strength_fn
        self.seed = int(seed)
        self.preset = str(preset)
        self.resize = resize
        self.allow_upscale = bool(allow_upscale)
        local = dict(local_crops or {})
        self.num_local = int(local.get("number", 0))
        self.local_size = int(local.get("size", 16))
        self.local_scale = tuple(local.get("scale", (0.05, 0.4)))
        self.cache_bytes = int(float(cache_mb) * 2**20)
        self._cache: DecodedImageCache | None = None
        train_transform(self.image_size, 1.0, self.prob, self.preset, self.resize, self.allow_upscale)  # fail early
        if self.num_local:
            self._local_transform(1.0)

    def __len__(self) -> int:
        return len(self.patients)

    def strength(self, step: int) -> float:
        return 1.0 if self.strength_fn is None else float(self.strength_fn(step))

    def _local_transform(self, strength: float) -> Callable[[Tensor], Tensor]:
        return local_transform(self.image_size, self.local_size, self.local_scale, strength, self.prob, self.preset,
                               self.resize, self.allow_upscale)

    def _read(self, path: str) -> Tensor:
        if not self.cache_bytes:
            return read_image(path)
        if self._cache is None:  # built lazily: each DataLoader worker gets its own
            self._cache = DecodedImageCache(read_image, self.cache_bytes)
        return self._cache(path)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}  # workers start empty rather than pickle the parent's

    def __getitem__(self, key: Key | int) -> dict[str, Any]:
        index, step = _key(key)
        if not 0 <= index < len(self.patients):
            raise IndexError(f"patient index {index} out of range (0..{len(self.patients) - 1})")
        transform = train_transform(
            self.image_size, self.strength(step), self.prob, self.preset, self.resize, self.allow_upscale
        )
        slides = self.slides[index]
        local = self._local_transform(self.strength(step)) if self.num_local else None
        # torchvision v2 draws from torch's global RNG: seed it inside a fork so the caller's
        # RNG state is untouched and the draw depends on the key alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_for(self.seed, step, index))
            per_slide, local_slide = [], []
            for s in _draw(len(slides), self.num_slide_samples).tolist():
                patches = slides[s]
                per_patch, local_patch = [], []
                for k in _draw(len(patches), self.num_patch_samples).tolist():
                    image = self._read(patches[k])
                    views = [_apply(transform, image, patches[k]) for _ in range(self.num_transforms)]
                    per_patch.append(torch.stack(views))
                    if local is not None:
                        local_patch.append(torch.stack([_apply(local, image, patches[k]) for _ in range(self.num_local)]))
                per_slide.append(torch.stack(per_patch))
                if local is not None:
                    local_slide.append(torch.stack(local_patch))
        item = {"images": torch.stack(per_slide), "label": self.labels[index], "patient": self.patients[index]}
        if local is not None:
            item["local_images"] = torch.stack(local_slide)  # (S, K, L, C, h, w): the student's local crops
        return item


class HierarchicalBatchSampler(Sampler[list[Key]]):
    """Yields, for each step in [start_step, total_steps), one list of `(patient_index, step)` keys.

    Patients are drawn without replacement within a step from an RNG seeded by `(seed, step)`
    only, so resuming at `start_step` replays exactly the batches of an uninterrupted run.
    `balance_classes` draws a class uniformly (among those with patients left) and then a
    patient within it. `patients_per_batch` is the GLOBAL batch: under DDP every rank draws the
    same global batch and keeps its contiguous slice of `patients_per_batch // world_size` keys.
    """

    def __init__(
        self,
        dataset_or_labels: HierarchicalDataset | Sequence[int],
        patients_per_batch: int,
        total_steps: int,
        start_step: int = 0,
        seed: int = 0,
        balance_classes: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        labels = getattr(dataset_or_labels, "labels", dataset_or_labels)
        self.labels = np.asarray(list(labels), dtype=np.int64)
        n = len(self.labels)
        if patients_per_batch < 1 or patients_per_batch > n:
            raise HSATError(
                f"data.patients_per_batch={patients_per_batch} must be between 1 and the number of "
                f"training patients ({n}): patients are drawn without replacement within a step "
                f"(set data.patients_per_batch: {max(1, n)} or fewer)"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise HSATError(f"rank {rank} is not within world_size {world_size}")
        if patients_per_batch % world_size:
            raise HSATError(
                f"data.patients_per_batch={patients_per_batch} (the global batch) must be divisible by "
                f"the number of processes ({world_size})"
            )
        if not 0 <= start_step <= total_steps:
            raise HSATError(f"start_step {start_step} must be within [0, total_steps={total_steps}]")
        self.patients_per_batch = int(patients_per_batch)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.seed = int(seed)
        self.balance_classes = bool(balance_classes)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self._by_class = [np.flatnonzero(self.labels == c) for c in np.unique(self.labels)]

    def global_batch(self, step: int) -> list[int]:
        """Patient indices of the whole (all ranks) batch of `step`."""
        rng = np.random.default_rng([self.seed % 2**64, int(step)])
        if not self.balance_classes:
            return rng.choice(len(self.labels), size=self.patients_per_batch, replace=False).tolist()
        left = [rng.permutation(members).tolist() for members in self._by_class]
        chosen: list[int] = []
        while len(chosen) < self.patients_per_batch:
            open_classes = [i for i, members in enumerate(left) if members]
            chosen.append(left[open_classes[int(rng.integers(len(open_classes)))]].pop())
        return chosen

    def __iter__(self) -> Iterator[list[Key]]:
        per_rank = self.patients_per_batch // self.world_size
        lo = self.rank * per_rank
        for step in range(self.start_step, self.total_steps):
            yield [(i, step) for i in self.global_batch(step)[lo : lo + per_rank]]

    def __len__(self) -> int:
        return self.total_steps - self.start_step


def collate_hierarchical(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack patients: `images (P, S, K, V, C, H, W)`, `label` LongTensor (P,), `patient` list."""
    out = {
        "images": torch.stack([it["images"] for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
        "patient": [str(it["patient"]) for it in items],
    }
    if items and "local_images" in items[0]:
        out["local_images"] = torch.stack([it["local_images"] for it in items])  # (P, S, K, L, C, h, w)
    return out


class PatchDataset(Dataset):
    """Flat evaluation dataset: one item per manifest row (of `split`; None = all rows).

    Item: `{"image": (3, H, W) via eval_transform, "label": int, "patient", "slide", "path",
    "index": row position in the split-filtered manifest}`. `rows`, `labels` expose the table
    for patient/slide aggregation without reading images. `resize` and `allow_upscale` are the
    trained run's `data.resize` and `data.allow_upscale`, so embedding and attacks see the pixel
    scale training saw; a patch too small for the crop raises HSATError naming its file.
    """

    def __init__(
        self,
        manifest: pd.DataFrame,
        split: str | None = None,
        image_size: int = 32,
        classes: list[str] | None = None,
        resize: dict[str, Any] | None = None,
        allow_upscale: bool = False,
    ):
        self.rows = _split_rows(manifest, split, "PatchDataset")
        self.classes, ids = _classes_and_ids(manifest, self.rows, classes)
        self.labels = np.asarray(ids, dtype=np.int64)
        self.transform = eval_transform(image_size, resize, allow_upscale)
        self._patients = self.rows["patient"].astype(str).tolist()
        self._slides = self.rows["slide"].astype(str).tolist()
        self._paths = self.rows["path"].astype(str).tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        path = self._paths[index]
        return {
            "image": _apply(self.transform, read_image(path), path),
            "label": int(self.labels[index]),
            "patient": self._patients[index],
            "slide": self._slides[index],
            "path": path,
            "index": index,
        }


class _Loader(DataLoader):
    """A DataLoader whose workers' HSATErrors reach the caller as their message alone.

    torch re-raises a worker's exception as the same type with the worker's whole traceback as
    the message; the CLI prints an HSATError's message, so keep the part the error wrote.
    """

    def __iter__(self):
        try:
            yield from super().__iter__()
        except HSATError as exc:
            text = str(exc)
            head = f"{type(exc).__module__}.{type(exc).__qualname__}: "
            if not text.startswith("Caught ") or head not in text:
                raise
            raise type(exc)(text.rsplit(head, 1)[1].rstrip("\n")) from None


def make_loader(
    dataset: HierarchicalDataset,
    batch_sampler: HierarchicalBatchSampler,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader over hierarchical batches (persistent workers when `num_workers > 0`); an
    HSATError in a worker (a patch too small, an unreadable file) is raised with its own message."""
    return _Loader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate_hierarchical,
        num_workers=int(num_workers),
        pin_memory=bool(pin_memory),
        persistent_workers=int(num_workers) > 0,
    )
