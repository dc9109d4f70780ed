"""OpenSRH reader: walk `meta/opensrh.json` + `meta/train_val_split.json` into a manifest.

Layout of a dataset root (the OpenSRH release, or `hsat synth`):

    meta/opensrh.json          patient -> {"class": str, "slides": {slide -> {"tumor_patches": [...],
                                                                           "normal_patches": [...],
                                                                           "nondiagnostic_patches": [...]}}}
    meta/train_val_split.json  {"train": [patient, ...], "val": [patient, ...]}
    studies/<patient>/<slide>/patches/<name>.tif   (2, H, W) uint16, (CH2, CH3)

Patients of class `normal` contribute their `normal_patches`, all others their `tumor_patches`
(as HiDisc does); non-diagnostic patches are never used. Decisions:

- Slide ids in the manifest are qualified by the patient (`<patient>-<slide>`, unless the id
  already starts with the patient id), because OpenSRH slide ids are only unique within a patient
  and the manifest requires a slide to belong to one patient.
- A patient in the metadata but in neither split is skipped with a warning (the split file
  defines the study, as in HiDisc); a patient in a split but absent from the metadata, in both
  splits, or with an unknown class is an error.
- A patient without slides, or a slide without patches of its class, is an error: it usually
  means a truncated or mismatched metadata file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from hsat import CLASSES
from hsat.data.manifest import COLUMNS, list_some, check_images as _check_images, validate_manifest
from hsat.errors import HSATError

log = logging.getLogger(__name__)

META_FILE = Path("meta") / "opensrh.json"
SPLIT_FILE = Path("meta") / "train_val_split.json"
PATCH_KEYS = ("tumor_patches", "normal_patches", "nondiagnostic_patches")


def patch_key(label: str) -> str:
    """Which patch list of a slide holds the patches of a patient of class `label`."""
    return "normal_patches" if label == "normal" else "tumor_patches"


def slide_id(patient: str, slide: str) -> str:
    """Globally unique slide id: OpenSRH slide ids are unique only within a patient."""
    return slide if slide.startswith(patient) else f"{patient}-{slide}"


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise HSATError(f"{path}: metadata file not found (is this an OpenSRH dataset root?)")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HSATError(f"{path}: invalid JSON: {exc}") from exc


def _read_split(path: Path) -> dict[str, str]:
    """patient -> split, rejecting malformed files and patients listed in both splits."""
    data = _load_json(path)
    if not isinstance(data, dict) or not {"train", "val"} <= set(data):
        raise HSATError(f"{path}: expected an object with lists 'train' and 'val'")
    split: dict[str, str] = {}
    for name in ("train", "val"):
        if not isinstance(data[name], list):
            raise HSATError(f"{path}: '{name}' must be a list of patient ids")
        for p in data[name]:
            split.setdefault(str(p), name)
    both = sorted(set(map(str, data["train"])) & set(map(str, data["val"])))
    if both:
        raise HSATError(f"{path}: patient-level leakage: patient(s) {list_some(both)} in both train and val")
    return split


def build_manifest(root: str | os.PathLike, check_images: bool = False) -> pd.DataFrame:
    """One row per usable patch of the patients in the split file, with absolute paths.

    With `check_images`, every patch is read once and must be a (2, H, W) uint16 TIFF.
    """
    root = Path(root).resolve()
    meta_path, split_path = root / META_FILE, root / SPLIT_FILE
    meta = _load_json(meta_path)
    split = _read_split(split_path)
    if not isinstance(meta, dict) or not meta:
        raise HSATError(f"{meta_path}: expected a non-empty object of patient id -> metadata")

    unknown_patients = [p for p in split if p not in meta]
    if unknown_patients:
        raise HSATError(f"{split_path}: patient(s) {list_some(unknown_patients)} not in {meta_path}")
    unsplit = [p for p in meta if p not in split]
    if unsplit:
        log.warning("%s: %d patient(s) in no split, skipped: %s", split_path, len(unsplit), list_some(unsplit))

    rows: list[tuple[str, str, str, str, str]] = []
    missing: list[str] = []
    for patient, info in meta.items():
        patient = str(patient)
        if patient not in split:
            continue
        where = f"{meta_path}: patient {patient}"
        if not isinstance(info, dict) or "class" not in info or "slides" not in info:
            raise HSATError(f"{where}: expected an object with 'class' and 'slides'")
        label = str(info["class"])
        if label not in CLASSES:
            raise HSATError(f"{where}: unknown class {label!r}; known: {list(CLASSES)}")
        slides = info["slides"]
        if not isinstance(slides, dict) or not slides:
            raise HSATError(f"{where}: no slides")
        key = patch_key(label)
        for slide, sinfo in slides.items():
            patches = sinfo.get(key) if isinstance(sinfo, dict) else None
            if not patches:
                raise HSATError(f"{where}, slide {slide}: no {key} (class {label})")
            sid = slide_id(patient, str(slide))
            for rel in patches:
                full = os.path.normpath(os.path.join(root, str(rel)))
                if not os.path.isfile(full):
                    missing.append(f"{full} (patient {patient}, slide {slide})")
                rows.append((patient, sid, full, label, split[patient]))
    if missing:
        raise HSATError(f"{meta_path}: {len(missing)} listed patch file(s) missing: {list_some(missing, 3)}")

    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = validate_manifest(df, str(meta_path), check_files=False)
    if check_images:
        _check_images(df, str(meta_path), srh_only=True)
    return df
