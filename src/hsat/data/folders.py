"""Folder-tree reader: `ROOT/<class>/<patient>/[<slide>/]<image>` into a manifest.

The two layouts, told apart per patient folder:

    ROOT/<class>/<patient>/<slide>/<image>   several slides per patient
    ROOT/<class>/<patient>/<image>           one slide per patient (the slide id is the patient's)

Decisions:

- Images are the files ending in `IMAGE_SUFFIXES` (any case). Hidden files and folders (a
  leading dot) are skipped silently; other non-image files are skipped with one warning.
- Slide ids are `<patient>-<slide>`, since slide folder names ("1", "2") repeat across patients
  and the manifest requires a slide to belong to one patient. Patient ids are the patient
  folder names and must be unique across classes.
- The split is at the patient level and stratified by class, as for the embedded cohort
  (`hsat.data.synthetic.stratified_split`): a class with >= 2 patients has
  round(val_fraction * n) of them in val, at least 1 and never all; a class with one patient is
  in train only.
- Layout mistakes are errors naming the folder: images directly in ROOT or in a class folder,
  an empty class, patient or slide folder, a patient folder holding both images and slide
  folders, folders below a slide folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from hsat.data.manifest import COLUMNS, VAL_FRACTION, list_some, validate_manifest
from hsat.data.synthetic import stratified_split
from hsat.errors import HSATError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LAYOUT = "ROOT/<class>/<patient>/<slide>/<image> or ROOT/<class>/<patient>/<image>"


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether `path` names an image by its suffix (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _entries(folder: Path) -> tuple[list[Path], list[Path]]:
    """(subfolders, other entries) of `folder`, hidden ones left out, each sorted by name."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not e.name.startswith(".")]
    except OSError as exc:
        raise HSATError(f"{folder}: cannot list folder: {exc}") from exc
    dirs = sorted(Path(e.path) for e in entries if e.is_dir())
    others = sorted(Path(e.path) for e in entries if not e.is_dir())
    return dirs, others


def _split_images(files: list[Path], ignored: list[Path]) -> list[Path]:
    """The image files among `files`; the rest are appended to `ignored`."""
    images = [f for f in files if is_image_file(f) and f.is_file()]
    ignored.extend(f for f in files if not (is_image_file(f) and f.is_file()))
    return images


def _names(paths: list[Path]) -> str:
    return list_some([p.name for p in paths])


def _patient_rows(folder: Path, label: str, ignored: list[Path]) -> list[tuple[str, str, str, str]]:
    """(patient, slide, path, label) of every image of one patient folder, in either layout."""
    patient = folder.name
    slide_dirs, files = _entries(folder)
    images = _split_images(files, ignored)
    if images and slide_dirs:
        raise HSATError(
            f"{folder}: patient folder holds both image files ({_names(images)}) and slide folders "
            f"({_names(slide_dirs)}); use one layout per patient: {LAYOUT}"
        )
    if images:
        return [(patient, patient, str(p), label) for p in images]
    if not slide_dirs:
        skipped = f" ({len(files)} non-image file(s) skipped: {_names(files)})" if files else ""
        raise HSATError(f"{folder}: patient folder has no images{skipped}; expected {LAYOUT}")
    rows = []
    for slide_dir in slide_dirs:
        below, files = _entries(slide_dir)
        if below:
            raise HSATError(
                f"{slide_dir}: slide folder holds folder(s) {_names(below)}; expected image files only ({LAYOUT})"
            )
        images = _split_images(files, ignored)
        if not images:
            skipped = f" ({len(files)} non-image file(s) skipped: {_names(files)})" if files else ""
            raise HSATError(f"{slide_dir}: slide folder has no images{skipped}")
        sid = f"{patient}-{slide_dir.name}"
        rows.extend((patient, sid, str(p), label) for p in images)
    return rows


def _patient_folders(root: Path, ignored: list[Path]) -> list[tuple[str, Path]]:
    """(class, patient folder) pairs, after checking the two top levels of the tree."""
    class_dirs, files = _entries(root)
    images = _split_images(files, ignored)
    if images:
        raise HSATError(f"{root}: image file(s) directly in the root ({_names(images)}); expected {LAYOUT}")
    if not class_dirs:
        raise HSATError(f"{root}: no class folders; expected {LAYOUT}")
    if len(class_dirs) == 1:
        log.warning(
            "%s: only one class folder (%s); is ROOT one level too high? Expected %s", root, class_dirs[0].name, LAYOUT
        )
    pairs = []
    for class_dir in class_dirs:
        patient_dirs, files = _entries(class_dir)
        images = _split_images(files, ignored)
        if images:
            raise HSATError(
                f"{class_dir}: class folder holds image files directly ({_names(images)}); "
                f"expected patient folders: {LAYOUT}"
            )
        if not patient_dirs:
            raise HSATError(f"{class_dir}: class folder has no patient folders; expected {LAYOUT}")
        pairs.extend((class_dir.name, p) for p in patient_dirs)

    first: dict[str, Path] = {}
    twice = []
    for _, folder in pairs:
        if folder.name in first:
            twice.append(f"{folder.name}: {first[folder.name]} and {folder}")
        first.setdefault(folder.name, folder)
    if twice:
        raise HSATError(
            f"{root}: patient id(s) under more than one class (patient folder names must be unique "
            f"across classes): {list_some(twice, 3)}"
        )
    return pairs


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise HSATError(f"--val-fraction must lie strictly between 0 and 1; got {val_fraction}")


def manifest_from_folders(
    root: str | os.PathLike, val_fraction: float = VAL_FRACTION, seed: int = 0
) -> pd.DataFrame:
    """One row per image of the tree at `root` (absolute paths), split by patient within each class.

    Deterministic for (`root`'s contents, `val_fraction`, `seed`). Images are listed, not read:
    `hsat.data.manifest.check_images` reads them.
    """
    check_val_fraction(val_fraction)
    root = Path(root)
    if not root.exists():
        raise HSATError(f"{root}: folder not found")
    if not root.is_dir():
        raise HSATError(f"{root}: not a directory; expected a folder tree {LAYOUT}")
    root = root.resolve()

    ignored: list[Path] = []
    rows = []
    for label, folder in _patient_folders(root, ignored):
        rows.extend(_patient_rows(folder, label, ignored))
    if ignored:
        log.warning(
            "%s: %d non-image file(s) skipped (images end in %s): %s",
            root, len(ignored), "/".join(IMAGE_SUFFIXES), list_some([str(p) for p in ignored], 3),
        )

    df = pd.DataFrame(rows, columns=["patient", "slide", "path", "label"])
    patients = df.drop_duplicates("patient").sort_values(["label", "patient"])
    split = stratified_split(patients["label"].tolist(), val_fraction, np.random.default_rng(seed))
    df["split"] = df["patient"].map(dict(zip(patients["patient"], split)))
    return validate_manifest(df[list(COLUMNS)], str(root), check_files=False)
