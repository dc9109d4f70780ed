"""The manifest: one row per patch (patient, slide, path, label, split), the only input later stages read.

`path` is absolute in memory; on disk it is relative to the folder holding the manifest (so a
study folder moves as one piece), or absolute where no relative path exists (another drive).
Validation rejects what would silently corrupt an experiment: patient-level leakage between
splits, a slide claimed by two patients, missing files, empty labels. Every message names the
manifest and the offending patient, slide or path. `hsat prepare` also reads every image once
(`check_images`, in parallel), so a corrupt file fails there and not mid-training, and reports
the patients and patches of each class per split (`split_report`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from hsat import CLASSES
from hsat.config import run_config_for_model
from hsat.data.srh import read_image, read_srh_raw
from hsat.errors import HSATError
from hsat.io import write_csv, write_json

log = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("patient", "slide", "path", "label", "split")
SPLITS: tuple[str, ...] = ("train", "val")
VAL_FRACTION = 0.33
"""Default fraction of each class's patients held out for val where `hsat` makes the split."""
PREPARE_REPORT = "prepare_report.csv"
REPORT_COLUMNS: tuple[str, ...] = ("patient", "slide", "label", "split", "listed", "missing", "used", "status")
"""The prepare report: one row per slide, patches listed (for an OpenSRH root: of the patient's
class), missing on disk, used; `status` is used | partial | skipped: none listed | skipped: all missing."""
_MAX_LISTED = 5  # offending items quoted in one message
PROGRESS_MIN_IMAGES = 500
"""`check_images` shows a progress bar (on a terminal) from this many images on."""
_CHECK_BATCH = 64  # images per task of the check's thread pool
_CHECK_STOP_AFTER = 100  # unreadable images after which the check stops reading


def list_some(items: Sequence, n: int = _MAX_LISTED) -> str:
    items = list(items)
    head = ", ".join(str(i) for i in items[:n])
    return head + (f" (and {len(items) - n} more)" if len(items) > n else "")


def validate_manifest(df: pd.DataFrame, source: str, check_files: bool = True) -> pd.DataFrame:
    """Return a clean copy of `df` (the five columns as str) or raise HSATError naming `source`.

    Checks: required columns, at least one row, no empty patient/slide/path/label, split in
    {train, val}, no patient in both splits, no slide under two patients, and (with
    `check_files`) that every path exists. Extra columns are kept as they are.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise HSATError(f"{source}: missing manifest column(s) {missing}; required: {list(COLUMNS)}")
    if len(df) == 0:
        raise HSATError(f"{source}: manifest has no rows")
    df = df.copy()
    for col in COLUMNS:
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            rows = (np.flatnonzero(empty.to_numpy()) + 2).tolist()  # +2: header line, 1-based
            raise HSATError(f"{source}: empty {col!r} on line(s) {list_some(rows)}")
        df[col] = df[col].astype(str)

    bad_split = sorted(set(df["split"]) - set(SPLITS))
    if bad_split:
        raise HSATError(f"{source}: unknown split value(s) {bad_split}; allowed: {list(SPLITS)}")

    splits_per_patient = df.groupby("patient", sort=True)["split"].nunique()
    leaked = splits_per_patient.index[splits_per_patient > 1].tolist()
    if leaked:
        raise HSATError(
            f"{source}: patient-level leakage: patient(s) {list_some(leaked)} appear in both train and val"
        )
    patients_per_slide = df.groupby("slide", sort=True)["patient"].unique()
    shared = {s: sorted(p) for s, p in patients_per_slide.items() if len(p) > 1}
    if shared:
        desc = "; ".join(f"slide {s} under patients {p}" for s, p in list(shared.items())[:_MAX_LISTED])
        raise HSATError(f"{source}: a slide belongs to more than one patient: {desc}")
    labels_per_patient = df.groupby("patient", sort=True)["label"].unique()
    mixed = {p: sorted(v) for p, v in labels_per_patient.items() if len(v) > 1}
    if mixed:
        log.warning("%s: patients with more than one label (kept): %s", source, list_some(mixed.items()))

    dup = df["path"][df["path"].duplicated()]
    if len(dup):
        raise HSATError(f"{source}: path(s) listed more than once: {list_some(dup.unique())}")
    if check_files:
        absent = [p for p in df["path"] if not os.path.isfile(p)]
        if absent:
            raise HSATError(f"{source}: {len(absent)} image file(s) not found: {list_some(absent)}")
    return df


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a manifest CSV; `path` values come back absolute.

    Relative paths are taken relative to the folder holding the manifest file, not the
    working directory, so a study folder can be moved or shared as one piece.
    """
    path = Path(path)
    if not path.is_file():
        raise HSATError(f"{path}: manifest file not found")
    try:
        # Ids stay strings ("007" is not 7) and empty fields stay empty, not NaN.
        df = pd.read_csv(path, dtype={c: str for c in COLUMNS}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise HSATError(f"{path}: cannot parse manifest CSV: {exc}") from exc
    if "path" in df.columns:
        base = path.resolve().parent
        df["path"] = [
            p if p == "" else os.path.normpath(os.path.join(base, os.path.expanduser(p))) for p in df["path"]
        ]
    return validate_manifest(df, str(path), check_files=check_files)


def _relative_to(p: str, folder: Path) -> str:
    try:
        return Path(os.path.relpath(p, folder)).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return p


def stored_paths(paths: Sequence[str], manifest: str | os.PathLike) -> list[str]:
    """Patch paths as the manifest at `manifest` stores them (relative to its folder): what a
    result file records to name a patch, so that it is the same wherever the study lies."""
    folder = Path(manifest).resolve().parent
    return [_relative_to(os.path.abspath(p), folder) for p in paths]


def same_patch(a: str, b: str) -> bool:
    """Whether two recorded patch paths name the same patch: equal as stored, or one absolute (a
    file from before results stored them relative) ending in the other."""
    a, b = str(a), str(b)
    if a == b:
        return True
    if os.path.isabs(a) == os.path.isabs(b):
        return False
    full, rel = (a, b) if os.path.isabs(a) else (b, a)
    return Path(full).as_posix().endswith("/" + Path(rel).as_posix().lstrip("./"))


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write `df` atomically with paths relative to the manifest's folder (five columns first)."""
    path = Path(path)
    folder = path.resolve().parent
    out = df.copy()
    out["path"] = [_relative_to(os.path.abspath(p), folder) for p in out["path"].astype(str)]
    extra = [c for c in out.columns if c not in COLUMNS]
    write_csv(path, out[list(COLUMNS) + extra])


def class_names(df: pd.DataFrame) -> list[str]:
    """Class names, index = label id: `hsat.CLASSES` if every label is an OpenSRH class, else sorted labels."""
    labels = set(df["label"].astype(str))
    if labels <= set(CLASSES):
        return list(CLASSES)
    return sorted(labels)


def label_ids(df: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Integer label id of every row (int64), following the order of `classes`."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(df["label"].astype(str)) - set(index))
    if unknown:
        raise HSATError(f"label(s) {unknown} not among the classes {list(classes)}")
    return df["label"].astype(str).map(index).to_numpy(dtype=np.int64)


def _read_errors(reader: Callable, paths: Sequence[str]) -> list[tuple[int, str]]:
    """(position in `paths`, message) of every path `reader` cannot read."""
    errors = []
    for i, path in enumerate(paths):
        try:
            reader(path)
        except HSATError as exc:
            errors.append((i, str(exc)))
        except Exception as exc:  # a reader bug or an exotic decoder error: still name the file
            errors.append((i, f"{path}: cannot read image: {type(exc).__name__}: {exc}"))
    return errors


def check_images(df: pd.DataFrame, source: str, srh_only: bool = False, workers: int | None = None) -> None:
    """Read every image once so corrupt, truncated or mis-shaped files fail now, not mid-training.

    With `srh_only`, each file must be a (2, H, W) uint16 SRH patch; otherwise anything
    `hsat.data.srh.read_image` accepts. Reads run on `workers` threads (decoders release the
    GIL); a progress bar shows on a terminal from `PROGRESS_MIN_IMAGES` images on. The error
    lists the unreadable files with patient, slide and reason; reading stops after
    `_CHECK_STOP_AFTER` of them.
    """
    reader = read_srh_raw if srh_only else read_image
    rows = df[["patient", "slide", "path"]].astype(str).to_numpy()
    paths = rows[:, 2].tolist()
    batches = [range(i, min(i + _CHECK_BATCH, len(paths))) for i in range(0, len(paths), _CHECK_BATCH)]
    workers = workers or min(32, (os.cpu_count() or 1) + 4)
    errors: list[tuple[int, str]] = []
    stopped = False
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(paths), desc="checking images", unit="img", disable=True if len(paths) < PROGRESS_MIN_IMAGES else None
    ) as bar:
        futures = [pool.submit(_read_errors, reader, paths[b.start : b.stop]) for b in batches]
        try:
            for batch, future in zip(batches, futures):
                errors.extend((batch.start + i, msg) for i, msg in future.result())
                bar.update(len(batch))
                if len(errors) >= _CHECK_STOP_AFTER:
                    stopped = True
                    break
        finally:
            for future in futures:
                future.cancel()
    if errors:
        count = f"{len(errors)}+ (stopped reading after {len(errors)})" if stopped else str(len(errors))
        lines = [f"  patient {rows[i, 0]}, slide {rows[i, 1]}: {msg}" for i, msg in errors[:_MAX_LISTED]]
        if len(errors) > _MAX_LISTED:
            lines.append(f"  (and {len(errors) - _MAX_LISTED} more)")
        raise HSATError(
            f"{source}: {count} image file(s) cannot be read (corrupt, truncated, not an image, or of the "
            "wrong dtype/shape); fix or remove them:\n" + "\n".join(lines)
        )


def summary(df: pd.DataFrame) -> str:
    """One line: patients / slides / patches per split, and the number of classes."""
    parts = []
    for split in SPLITS:
        sub = df[df["split"] == split]
        parts.append(f"{split}: {sub['patient'].nunique()} patients, {sub['slide'].nunique()} slides, {len(sub)} patches")
    return "; ".join(parts) + f"; {df['label'].nunique()} classes"


def split_report(df: pd.DataFrame) -> pd.DataFrame:
    """Per class (in `class_names` order): patients and patches in train and in val."""
    counts = (
        df.groupby(["label", "split"])
        .agg(patients=("patient", "nunique"), patches=("path", "size"))
        .unstack("split", fill_value=0)
    )
    present = set(df["label"].astype(str))
    table = pd.DataFrame({"class": [c for c in class_names(df) if c in present]})
    for split in SPLITS:
        for what in ("patients", "patches"):
            col = (what, split)
            values = counts[col] if col in counts.columns else pd.Series(0, index=counts.index)
            table[f"{split}_{what}"] = table["class"].map(values).fillna(0).astype(int).to_numpy()
    return table


def split_warnings(df: pd.DataFrame) -> list[str]:
    """One sentence per class missing from val or from train, naming the class."""
    out = []
    for row in split_report(df).to_dict("records"):
        n = row["train_patients"] + row["val_patients"]
        who = "1 patient: it is" if n == 1 else f"{n} patients, all"
        if row["val_patients"] == 0:
            out.append(f"class {row['class']!r} has {who} in train only; its validation accuracy cannot be measured")
        elif row["train_patients"] == 0:
            out.append(f"class {row['class']!r} has {who} in val only; no classifier fit on train can predict it")
    return out


def run_data_errors(run_cfg: Mapping[str, Any], df: pd.DataFrame, nproc: int = 1, nodes: int = 1) -> list[str]:
    """What in a run config cannot work on this manifest, each naming the key and what to set.

    The workflow and `hsat config show` call it when the study is planned, so that a setting that
    does not fit the data stops the dry run, not the training after it. Settings the data decides
    are not listed: data.patients_per_batch above the number of training patients takes them all
    (hsat.train.fit_to_data), the attacked subset and kNN's k shrink to what there is. The batch
    is split over every process: `nproc` per node on each of `nodes`.
    """
    errors = []
    classes = class_names(df)
    if df["label"].nunique() < 2:
        errors.append(f"the manifest has one class ({', '.join(map(str, df['label'].unique()))}); "
                      "classification needs at least 2")
    n_train = int(df.loc[df["split"] == "train", "patient"].nunique())
    batch = int(run_cfg["data"]["patients_per_batch"])
    if n_train < 2:
        errors.append(f"the manifest has {n_train} training patient(s); pretraining draws at least 2 per step "
                      "(more patients, or a smaller `hsat prepare --val-fraction`)")
    elif min(batch, n_train) % (nproc * nodes):
        used, world = min(batch, n_train), nproc * nodes
        fit = used - used % world
        todo = (f"set pretrain.data.patients_per_batch: {fit}" if fit
                else f"use at most {n_train} processes")
        procs = (f"launcher.nproc_per_node={nproc}" if nodes == 1
                 else f"the {world} processes (launcher.nodes={nodes} x launcher.nproc_per_node={nproc})")
        errors.append(f"data.patients_per_batch={batch} ({used} with the manifest's {n_train} training patients) "
                      f"must be divisible by {procs}: {todo}")
    hlss = (run_cfg.get("method") or {}).get("hlss")
    if hlss and hlss.get("descriptions"):
        described = _described_classes(hlss["descriptions"])
        missing = [c for c in classes if described is not None and c not in described]
        if missing:
            errors.append(f"method.hlss.descriptions: {hlss['descriptions']} describes {described}, not the "
                          f"manifest's class(es) {missing}: write a descriptions file for your classes (the layout "
                          "of config/attributes/srh.yaml) and set method.hlss.descriptions to it")
    return errors


def study_data_errors(study: Mapping[str, Any]) -> list[str]:
    """`run_data_errors` of every model of a resolved study on its dataset.manifest (none when the
    study reads OpenSRH or the embedded cohort, or the manifest is not there yet), one line per
    problem with the models it concerns."""
    path = (study.get("dataset") or {}).get("manifest")
    if not path or not Path(path).is_file():
        return []
    table = read_manifest(path, check_files=False)
    launcher = study.get("launcher") or {}
    nproc, nodes = int(launcher.get("nproc_per_node", 1)), int(launcher.get("nodes", 1))
    found: dict[str, list[str]] = {}
    for name in study["models"]:
        for message in run_data_errors(run_config_for_model(study, name), table, nproc, nodes):
            found.setdefault(message, []).append(name)
    return [f"{path}: {message} (models: {', '.join(names)})" for message, names in found.items()]


def _described_classes(path: str | os.PathLike) -> list[str] | None:
    """The `classes` of an HLSS descriptions file; None if it cannot be read (pretraining says why)."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    found = data.get("classes") if isinstance(data, dict) else None
    return [str(c) for c in found] if isinstance(found, list) else None


def format_split_report(df: pd.DataFrame) -> str:
    """`split_report` as a text table, followed by one `warning:` line per `split_warnings`."""
    lines = [split_report(df).to_string(index=False)]
    lines += [f"warning: {w}" for w in split_warnings(df)]
    return "\n".join(lines)


def prepare_manifest(
    out: str | os.PathLike,
    root: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    folders: str | os.PathLike | None = None,
    check: bool = True,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    opensrh: Mapping[str, Any] | None = None,
    report: str | os.PathLike | None = None,
    record: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """`hsat prepare`: build (from an OpenSRH root or a folder tree) or re-validate (a user manifest), then write `out`.

    With `check` (the default) every image is read once. `val_fraction` and `seed` make the
    split of a folder tree; the other sources carry their split. `opensrh` holds the options of
    `hsat.data.opensrh.read_opensrh` (meta file names, the missing-patch limit, strict). Classes
    missing from a split are logged as warnings. Beside the manifest goes the per-slide report
    (`report`, default `prepare_report.csv` in the manifest's folder: what was used and what
    skipped); with `record`, a folder holding `source.json` (`write_source_record`). Nothing is
    written unless every check passes; the manifest is written last.
    """
    if sum(x is not None for x in (root, manifest, folders)) != 1:
        raise HSATError("give exactly one of a dataset root, a manifest or a folder tree")
    if opensrh and root is None:
        raise HSATError("the OpenSRH options (meta file names, missing-patch limit, strict) apply to a dataset root only")
    table = None
    if root is not None:
        from hsat.data.opensrh import read_opensrh  # local: opensrh imports this module

        df, table = read_opensrh(root, check_images=check, **(opensrh or {}))
    elif manifest is not None:
        df = read_manifest(manifest, check_files=True)
        if check:
            check_images(df, str(manifest))
    else:
        from hsat.data.folders import manifest_from_folders  # local: folders imports this module

        df = manifest_from_folders(folders, val_fraction=val_fraction, seed=seed)
        if check:
            check_images(df, str(folders))
    for warning in split_warnings(df):
        log.warning("%s", warning)
    write_csv(report_path(out) if report is None else report, slide_report(df) if table is None else table)
    if record is not None:
        write_source_record(record, root=root, manifest=manifest, folders=folders, opensrh=opensrh)
    write_manifest(df, out)
    return df


def report_path(out: str | os.PathLike) -> Path:
    """Where `hsat prepare` writes its report by default: beside the manifest."""
    return Path(out).with_name(PREPARE_REPORT)


def slide_report(df: pd.DataFrame) -> pd.DataFrame:
    """The prepare report of a manifest source (nothing listed goes missing there): patches per slide."""
    per = df.groupby(["patient", "slide", "label", "split"], sort=False).size().reset_index(name="listed")
    per["missing"] = 0
    per["used"] = per["listed"]
    per["status"] = "used"
    return per[list(REPORT_COLUMNS)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_source_record(
    folder: str | os.PathLike,
    root: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    folders: str | os.PathLike | None = None,
    opensrh: Mapping[str, Any] | None = None,
) -> Path:
    """Write `folder/source.json`: where the study's patches come from when they are not the
    synthesised cohort (an OpenSRH root or a user manifest): the path, and the sha256 of the
    files that define the study (the meta files, or the manifest). The workflow's dataset folder
    then exists for every source, so DVC versions which download a study read."""
    record: dict[str, Any]
    if root is not None:
        from hsat.data.opensrh import META_JSON, SPLIT_JSON, meta_paths  # local: opensrh imports this module

        names = {"meta_json": META_JSON, "split_json": SPLIT_JSON, **{k: v for k, v in (opensrh or {}).items()
                                                                      if k in ("meta_json", "split_json")}}
        files = meta_paths(root, names["meta_json"], names["split_json"])
        record = {"source": "opensrh", "root": str(Path(root).resolve()), **names,
                  "sha256": {f.name: _sha256(f) for f in files}}
    elif manifest is not None:
        record = {"source": "manifest", "manifest": str(Path(manifest).resolve()),
                  "sha256": {Path(manifest).name: _sha256(Path(manifest))}}
    else:
        record = {"source": "folders", "folders": str(Path(folders).resolve())}
    path = Path(folder) / "source.json"
    write_json(path, record)
    return path
