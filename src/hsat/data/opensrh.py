"""OpenSRH reader: walk the metadata (`meta/opensrh.json` + `meta/train_val_split.json`) into a manifest.

Layout of a dataset root (the OpenSRH release, `hsat synth`, or `hsat.data.fake_opensrh`):

    meta/opensrh.json          patient -> {"class": str, "slides": {slide -> {"tumor_patches": [...],
                                                                           "normal_patches": [...],
                                                                           "nondiagnostic_patches": [...]}}}
    meta/train_val_split.json  {"train": [patient, ...], "val": [patient, ...]}
    studies/<patient>/<slide>/patches/<name>.tif   (2, H, W) uint16, (CH2, CH3)

The two meta files may carry other names (`meta_json`, `split_json`: `dataset.meta_json` and
`dataset.split_json` of the study config), e.g. the pruned `updated2_*.json` files HLSS ships.

Patients of class `normal` contribute their `normal_patches`, all others their `tumor_patches`
(as HiDisc does); non-diagnostic patches are never used. Decisions:

- Slide ids in the manifest are qualified by the patient (`<patient>-<slide>`, unless the id
  already starts with the patient id), because OpenSRH slide ids are only unique within a patient
  and the manifest requires a slide to belong to one patient.
- A patient in the metadata but in neither split is skipped with a warning (the split file
  defines the study, as in HiDisc); a patient in a split but absent from the metadata, in both
  splits, or with an unknown class is an error.
- The data as downloaded is read as HiDisc, HSAT and HLSS read it: a slide without patches of
  its patient's class is skipped, a patch listed in the metadata but missing on disk is skipped,
  a patient left without any patch is skipped; each with a warning that counts them per slide,
  and every slide's counts go to the prepare report (`read_opensrh`'s second table). It is an
  error only with `strict`, or when more than `max_missing_fraction` of the listed patches are
  missing (default 5 %: more than that is an incomplete download or extraction, not pruning).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from hsat import CLASSES
from hsat.data.manifest import COLUMNS, REPORT_COLUMNS, list_some, check_images as _check_images, validate_manifest
from hsat.errors import HSATError

log = logging.getLogger(__name__)

META_JSON = "opensrh.json"
SPLIT_JSON = "train_val_split.json"
META_FILE = Path("meta") / META_JSON
SPLIT_FILE = Path("meta") / SPLIT_JSON
PATCH_KEYS = ("tumor_patches", "normal_patches", "nondiagnostic_patches")
MAX_MISSING_FRACTION = 0.05
"""Default `dataset.max_missing_fraction`: above it, missing listed patches are an error."""


def patch_key(label: str) -> str:
    """Which patch list of a slide holds the patches of a patient of class `label`."""
    return "normal_patches" if label == "normal" else "tumor_patches"


def slide_id(patient: str, slide: str) -> str:
    """Globally unique slide id: OpenSRH slide ids are unique only within a patient."""
    return slide if slide.startswith(patient) else f"{patient}-{slide}"


def meta_paths(root: str | os.PathLike, meta_json: str = META_JSON, split_json: str = SPLIT_JSON) -> tuple[Path, Path]:
    """The metadata and split files of a dataset root: names relative to `<root>/meta/` (or absolute)."""
    meta = Path(root) / "meta"
    return meta / meta_json, meta / split_json


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


def _status(listed: int, missing: int) -> str:
    if listed == 0:
        return "skipped: none listed"
    if missing == listed:
        return "skipped: all missing"
    return "partial" if missing else "used"


def read_opensrh(
    root: str | os.PathLike,
    check_images: bool = False,
    meta_json: str = META_JSON,
    split_json: str = SPLIT_JSON,
    max_missing_fraction: float = MAX_MISSING_FRACTION,
    strict: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, report): one manifest row per usable patch of the patients in the split file,
    with absolute paths, and one report row per slide of those patients (`REPORT_COLUMNS`).

    What is skipped, and when that is an error instead, is in the module docstring. With
    `check_images`, every patch used is read once and must be a (2, H, W) uint16 TIFF.
    """
    if not 0.0 <= max_missing_fraction <= 1.0:
        raise HSATError(f"dataset.max_missing_fraction must lie in [0, 1], got {max_missing_fraction!r}")
    root = Path(root).resolve()
    meta_path, split_path = meta_paths(root, meta_json, split_json)
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
    report: list[tuple] = []
    missing: list[str] = []
    empty_patients: list[str] = []
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
        if not isinstance(slides, dict):
            raise HSATError(f"{where}: 'slides' must be an object of slide id -> patch lists")
        if not slides:
            if strict:
                raise HSATError(f"{where}: no slides (--strict)")
            empty_patients.append(patient)
            continue
        key = patch_key(label)
        used_before = len(rows)
        for slide, sinfo in slides.items():
            if not isinstance(sinfo, dict):
                raise HSATError(f"{where}, slide {slide}: expected an object of patch lists")
            patches = sinfo.get(key) or []
            if not isinstance(patches, list):
                raise HSATError(f"{where}, slide {slide}: '{key}' must be a list of paths")
            if not patches and strict:
                raise HSATError(f"{where}, slide {slide}: no {key} (class {label}; --strict)")
            sid = slide_id(patient, str(slide))
            gone = 0
            for rel in patches:
                full = os.path.normpath(os.path.join(root, str(rel)))
                if os.path.isfile(full):
                    rows.append((patient, sid, full, label, split[patient]))
                else:
                    gone += 1
                    missing.append(f"{full} (patient {patient}, slide {slide})")
            report.append((patient, sid, label, split[patient], len(patches), gone, len(patches) - gone,
                           _status(len(patches), gone)))
        if len(rows) == used_before:
            empty_patients.append(patient)

    report_df = pd.DataFrame(report, columns=list(REPORT_COLUMNS))
    listed = int(report_df["listed"].sum()) if len(report_df) else 0
    if missing and (strict or len(missing) > max_missing_fraction * listed):
        why = "--strict" if strict else (
            f"{len(missing) / max(listed, 1):.1%} of {listed} listed, above dataset.max_missing_fraction = "
            f"{max_missing_fraction:g}: an incomplete download? fix the files, or name pruned meta files "
            "with dataset.meta_json / dataset.split_json")
        raise HSATError(f"{meta_path}: {len(missing)} listed patch file(s) missing ({why}): {list_some(missing, 3)}")
    _warn_skipped(meta_path, report_df, empty_patients)
    if not rows:
        raise HSATError(f"{meta_path}: no usable patch for any patient of {split_path}")

    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df = validate_manifest(df, str(meta_path), check_files=False)
    if check_images:
        _check_images(df, str(meta_path), srh_only=True)
    return df, report_df


def _warn_skipped(meta_path: Path, report: pd.DataFrame, empty_patients: list[str]) -> None:
    """One warning per kind of skip, counting per slide (the report file has every slide)."""
    none = report[report["listed"] == 0]
    if len(none):
        log.warning("%s: %d slide(s) without patches of their patient's class, skipped: %s", meta_path,
                    len(none), list_some([f"{r.slide} (class {r.label})" for r in none.itertuples()]))
    gone = report[report["missing"] > 0]
    if len(gone):
        log.warning("%s: %d of %d listed patch file(s) missing on disk, skipped, on %d slide(s): %s", meta_path,
                    int(gone["missing"].sum()), int(report["listed"].sum()), len(gone),
                    list_some([f"{r.slide}: {r.missing} of {r.listed}" for r in gone.itertuples()]))
    if empty_patients:
        log.warning("%s: %d patient(s) without any usable patch, skipped: %s", meta_path, len(empty_patients),
                    list_some(empty_patients))


def build_manifest(root: str | os.PathLike, check_images: bool = False, **options: Any) -> pd.DataFrame:
    """The manifest of `read_opensrh` (its `options`: meta file names, the missing-patch limit, strict)."""
    return read_opensrh(root, check_images=check_images, **options)[0]
