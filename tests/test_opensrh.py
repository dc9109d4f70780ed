"""OpenSRH reader: every bad input gives a clear error, exit 2 and no manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hsat.cli import main
from hsat.data.opensrh import build_manifest
from hsat.data.synthetic import synthesize_cohort


@pytest.fixture
def cohort(tmp_path) -> Path:
    """A fresh small cohort each test may damage: 7 patients (one per class), 2 slides, 2 patches."""
    return synthesize_cohort(tmp_path / "cohort", patients=7, slides=2, patches=2, size=16, seed=0)


def _meta(root: Path) -> dict:
    return json.loads((root / "meta" / "opensrh.json").read_text())


def _set_meta(root: Path, meta: dict) -> None:
    (root / "meta" / "opensrh.json").write_text(json.dumps(meta))


def _first_patch(root: Path) -> tuple[str, Path]:
    patient, info = next(iter(_meta(root).items()))
    return patient, root / info["slides"]["1"]["tumor_patches"][0]


def _missing_meta(root):
    (root / "meta" / "opensrh.json").unlink()
    return ["opensrh.json", "not found"]


def _missing_split(root):
    (root / "meta" / "train_val_split.json").unlink()
    return ["train_val_split.json", "not found"]


def _invalid_json(root):
    (root / "meta" / "opensrh.json").write_text("{ not json")
    return ["opensrh.json", "invalid JSON"]


def _leakage(root):
    path = root / "meta" / "train_val_split.json"
    split = json.loads(path.read_text())
    split["val"].append(split["train"][0])
    path.write_text(json.dumps(split))
    return ["train_val_split.json", split["train"][0], "both train and val"]


def _split_patient_unknown(root):
    path = root / "meta" / "train_val_split.json"
    split = json.loads(path.read_text())
    split["train"].append("GHOST42")
    path.write_text(json.dumps(split))
    return ["GHOST42", "opensrh.json"]


def _patient_no_slides(root):
    meta = _meta(root)
    patient = next(iter(meta))
    meta[patient]["slides"] = {}
    _set_meta(root, meta)
    return [f"patient {patient}", "no slides"]


def _slide_no_patches(root):
    meta = _meta(root)
    patient = next(iter(meta))
    meta[patient]["slides"]["2"]["tumor_patches"] = []
    _set_meta(root, meta)
    return [f"patient {patient}", "slide 2", "no tumor_patches"]


def _patch_missing(root):
    patient, patch = _first_patch(root)
    patch.unlink()
    return [patch.name, f"patient {patient}", "missing"]


def _unknown_class(root):
    meta = _meta(root)
    patient = next(iter(meta))
    meta[patient]["class"] = "astrocytoma"
    _set_meta(root, meta)
    return [f"patient {patient}", "astrocytoma", "unknown class"]


def _corrupt_tiff(root):
    patient, patch = _first_patch(root)
    patch.write_bytes(b"\x00garbage" * 40)
    return [patch.name, f"patient {patient}", "corrupt"]


def _truncated_tiff(root):
    patient, patch = _first_patch(root)
    data = patch.read_bytes()
    patch.write_bytes(data[: len(data) // 2])
    return [patch.name, f"patient {patient}", "truncated"]


def _wrong_dtype(root):
    patient, patch = _first_patch(root)
    tifffile.imwrite(patch, np.ones((2, 16, 16), np.float32), photometric="minisblack", planarconfig="separate")
    return [patch.name, f"patient {patient}", "uint16", "float32"]


def _wrong_channels(root):
    patient, patch = _first_patch(root)
    tifffile.imwrite(patch, np.ones((3, 16, 16), np.uint16), photometric="rgb", planarconfig="separate")
    return [patch.name, f"patient {patient}", "(2, H, W)"]


CASES = {
    "missing meta": (_missing_meta, False),
    "missing split": (_missing_split, False),
    "invalid json": (_invalid_json, False),
    "patient in both splits": (_leakage, False),
    "split patient not in metadata": (_split_patient_unknown, False),
    "patient without slides": (_patient_no_slides, False),
    "slide without patches": (_slide_no_patches, False),
    "listed patch missing": (_patch_missing, False),
    "unknown class": (_unknown_class, False),
    "corrupt tiff": (_corrupt_tiff, True),
    "truncated tiff": (_truncated_tiff, True),
    "wrong dtype": (_wrong_dtype, True),
    "wrong channel count": (_wrong_channels, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_clear_error_and_nothing_written(cohort, tmp_path, capsys, case):
    damage, check = CASES[case]
    expected = damage(cohort)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "manifest.csv"
    rc = main(["prepare", "--root", str(cohort), "--out", str(out)] + (["--check-images"] if check else []))
    err = capsys.readouterr().err
    assert rc == 2
    for piece in expected:
        assert piece in err, f"{piece!r} not in: {err}"
    assert not out.exists() and list(out_dir.iterdir()) == []


def test_image_damage_passes_without_check_images(cohort):
    """Without --check-images only existence is checked (fast); the damage surfaces at read time."""
    _corrupt_tiff(cohort)
    assert len(build_manifest(cohort)) == 7 * 2 * 2


def test_patient_in_no_split_is_skipped_with_warning(cohort, caplog):
    path = cohort / "meta" / "train_val_split.json"
    split = json.loads(path.read_text())
    dropped = split["train"].pop(0)
    path.write_text(json.dumps(split))
    with caplog.at_level(logging.WARNING):
        df = build_manifest(cohort)
    assert dropped not in set(df["patient"])
    assert dropped in caplog.text


def test_manifest_rows(cohort):
    df = build_manifest(cohort, check_images=True)
    meta = _meta(cohort)
    assert df.groupby("patient")["label"].first().to_dict() == {p: m["class"] for p, m in meta.items()}
    assert all(Path(p).is_absolute() for p in df["path"])
    assert df["slide"].nunique() == 14  # qualified by patient: "<patient>-<slide>"
    normal = [p for p, m in meta.items() if m["class"] == "normal"][0]
    assert (df[df["patient"] == normal]["path"].str.contains(f"studies/{normal}/")).all()
