"""A format-exact fake OpenSRH: the release's layout, file names and metadata keys, with noise for pixels.

For tests and rehearsals of the paper's path without the download. What is exact (the reader,
`hsat.data.opensrh`, and the references HiDisc, HSAT and HLSS read OpenSRH the same way):

- `meta/opensrh.json`: patient -> {"class", "slides": {slide -> {"normal_patches",
  "tumor_patches", "nondiagnostic_patches"}}}, patch paths relative to the root;
  `meta/train_val_split.json`: {"train": [...], "val": [...]}.
- `studies/<patient>/<slide>/patches/<patient>-<slide>-<n>.tif`: (2, H, W) uint16 TIFFs (CH2, CH3),
  300 px by default, written by tifffile.
- Patients `NIO_###` of the seven classes (`hsat.CLASSES`); slides of tumour patients also list
  normal and non-diagnostic patches, which no method uses; optionally (`excluded_patients`)
  patients of other diagnoses that are in no split, as in the release.
- On request, what a real download holds: slides with no patch of their patient's class
  (`empty_slides`: only non-diagnostic ones) and patches listed but missing on disk
  (`missing_patches`).

Pixels are deterministic noise around SRH-like intensities: nothing here is meant to be learnt
(the embedded cohort, `hsat.data.synthetic`, is for that).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import tifffile

from hsat import CLASSES
from hsat.errors import HSATError

EXCLUDED_CLASSES: tuple[str, ...] = ("ependym", "medullo")
"""Diagnoses outside the seven classes, for patients in no split (`excluded_patients`)."""


@dataclasses.dataclass(frozen=True)
class FakeOpenSRH:
    """What `write_fake_opensrh` wrote: the root, and the damage it was asked for (paths relative to it)."""

    root: Path
    patients: dict[str, str]  # patient -> class, for the patients of the split
    split: dict[str, list[str]]
    empty_slides: list[tuple[str, str]]  # (patient, slide): no patch of the patient's class listed
    missing_patches: list[str]  # listed in the metadata, not on disk
    usable_patches: int  # patches a reader should keep


def _patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """(2, size, size) uint16 around OpenSRH's raw levels (CH2 lipid below CH3 protein)."""
    base = np.array([9000.0, 14000.0])[:, None, None]
    return np.clip(base + 2500.0 * rng.standard_normal((2, size, size)), 0, 65535).astype(np.uint16)


def write_fake_opensrh(
    root: str | os.PathLike,
    patients_per_class: int = 2,
    slides: int = 2,
    patches: int = 3,
    size: int = 300,
    seed: int = 0,
    val_per_class: int = 1,
    empty_slides: int = 0,
    missing_patches: int = 0,
    excluded_patients: int = 0,
) -> FakeOpenSRH:
    """Write a fake OpenSRH under `root` (absent or empty) and say what it holds.

    `patients_per_class` patients of each of the seven classes, `val_per_class` of them in val;
    `slides` slides per patient, `patches` patches of the patient's class per slide (plus one
    non-diagnostic patch, and one normal patch on a tumour patient's slide). `empty_slides`
    slides (never a patient's only one) list no patch of their class; `missing_patches` listed
    patches of other slides are not written. Damage is spread over patients in a seeded order.
    """
    if patients_per_class < 1 or slides < 1 or patches < 1 or not 8 <= size <= 1024:
        raise HSATError("write_fake_opensrh: patients_per_class, slides and patches >= 1, size in [8, 1024]")
    if val_per_class < 0 or (val_per_class and val_per_class >= patients_per_class):
        raise HSATError(f"write_fake_opensrh: val_per_class must be below patients_per_class ({patients_per_class})")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise HSATError(f"{root}: exists and is not an empty directory")
    rng = np.random.default_rng(seed)

    labels = [c for c in CLASSES for _ in range(patients_per_class)]
    ids = [f"NIO_{i + 1:03d}" for i in range(len(labels))]
    slide_ids = [str(s + 1) for s in range(slides)]
    order = rng.permutation(len(ids))
    # Empty slides: the last slide of patients in the seeded order, one per patient, if it has two.
    can_empty = [ids[i] for i in order] if slides > 1 else []
    if empty_slides > len(can_empty):
        raise HSATError(f"write_fake_opensrh: at most {len(can_empty)} empty slides (one per patient, slides >= 2)")
    empty = {(p, slide_ids[-1]) for p in can_empty[:empty_slides]}
    # Missing patches: one per slide, from the first slide of patients in the seeded order onwards.
    candidates = [(ids[i], s) for s in slide_ids for i in order if (ids[i], s) not in empty]
    if missing_patches > len(candidates):
        raise HSATError(f"write_fake_opensrh: at most {len(candidates)} missing patches (one per slide)")
    gone_slides = set(candidates[:missing_patches])

    meta: dict[str, dict] = {}
    missing: list[str] = []
    usable = 0
    for pid, label in zip(ids, labels):
        key = "normal_patches" if label == "normal" else "tumor_patches"
        slide_meta = {}
        for sid in slide_ids:
            folder = root / "studies" / pid / sid / "patches"
            folder.mkdir(parents=True)
            names = [f"studies/{pid}/{sid}/patches/{pid}-{sid}-{k}.tif" for k in range(patches + 2)]
            lists = {"normal_patches": [], "tumor_patches": [], "nondiagnostic_patches": [names[-1]]}
            if (pid, sid) not in empty:
                lists[key] = names[:patches]
            if label != "normal":
                lists["normal_patches"] = [names[patches]]
            for rel in lists["normal_patches"] + lists["tumor_patches"] + lists["nondiagnostic_patches"]:
                if (pid, sid) in gone_slides and rel == lists[key][0]:
                    missing.append(rel)
                    continue
                tifffile.imwrite(root / rel, _patch(rng, size), photometric="minisblack",
                                 planarconfig="separate", metadata=None)
            usable += len(lists[key]) - ((pid, sid) in gone_slides)
            slide_meta[sid] = lists
        meta[pid] = {"class": label, "slides": slide_meta}
    for i in range(excluded_patients):
        pid = f"NIO_{len(ids) + i + 1:03d}"
        rel = f"studies/{pid}/1/patches/{pid}-1-0.tif"
        (root / rel).parent.mkdir(parents=True)
        tifffile.imwrite(root / rel, _patch(rng, size), photometric="minisblack", planarconfig="separate", metadata=None)
        meta[pid] = {"class": EXCLUDED_CLASSES[i % len(EXCLUDED_CLASSES)],
                     "slides": {"1": {"normal_patches": [], "tumor_patches": [rel], "nondiagnostic_patches": []}}}

    split = {"train": [], "val": []}
    for c in CLASSES:
        members = [p for p, lab in zip(ids, labels) if lab == c]
        split["val"] += members[:val_per_class]
        split["train"] += members[val_per_class:]
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "opensrh.json").write_text(json.dumps(meta, indent=4) + "\n", encoding="utf-8")
    (root / "meta" / "train_val_split.json").write_text(json.dumps(split, indent=4) + "\n", encoding="utf-8")
    return FakeOpenSRH(root=root, patients=dict(zip(ids, labels)), split=split, empty_slides=sorted(empty),
                       missing_patches=missing, usable_patches=usable)
