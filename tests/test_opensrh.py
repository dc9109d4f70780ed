"""OpenSRH reader: every bad input gives a clear error, exit 2 and no manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
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
    "patient without slides": (_patient_no_slides, "strict"),
    "slide without patches": (_slide_no_patches, "strict"),
    "listed patch missing": (_patch_missing, "strict"),
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
    extra = {True: ["--check-images"], False: [], "strict": ["--strict"]}[check]
    rc = main(["prepare", "--root", str(cohort), "--out", str(out)] + extra)
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


# ---------------------------------------------------------------- OpenSRH as downloaded (the fake release)
from hsat.data.fake_opensrh import write_fake_opensrh  # noqa: E402
from hsat.data.manifest import read_manifest  # noqa: E402
from hsat.data.opensrh import read_opensrh  # noqa: E402
from hsat.data.srh import read_srh_raw  # noqa: E402


def test_fake_opensrh_has_the_release_format(tmp_path):
    fake = write_fake_opensrh(tmp_path / "opensrh", patients_per_class=1, slides=1, patches=1, val_per_class=0,
                              excluded_patients=1)
    meta = json.loads((fake.root / "meta" / "opensrh.json").read_text())
    split = json.loads((fake.root / "meta" / "train_val_split.json").read_text())
    assert set(split) == {"train", "val"} and sorted(split["train"]) == sorted(fake.patients)
    assert {m["class"] for p, m in meta.items() if p in fake.patients} == {
        "hgg", "lgg", "mening", "metast", "normal", "pituita", "schwan"}
    excluded = [p for p in meta if p not in fake.patients]
    assert len(excluded) == 1 and meta[excluded[0]]["class"] not in fake.patients.values()
    for patient, info in meta.items():
        assert set(info) == {"class", "slides"}
        for slide, lists in info["slides"].items():
            assert set(lists) == {"normal_patches", "tumor_patches", "nondiagnostic_patches"}
            for rel in sum(lists.values(), []):
                assert rel.startswith(f"studies/{patient}/{slide}/patches/{patient}-{slide}-") and rel.endswith(".tif")
    tumour = next(p for p, c in fake.patients.items() if c == "hgg")
    lists = meta[tumour]["slides"]["1"]
    assert lists["normal_patches"] and lists["nondiagnostic_patches"]  # listed, never used
    raw = read_srh_raw(fake.root / lists["tumor_patches"][0])
    assert raw.shape == (2, 300, 300) and raw.dtype == np.uint16
    df = build_manifest(fake.root, check_images=True)
    assert len(df) == fake.usable_patches == 7 and set(df["patient"]) == set(fake.patients)


def test_download_as_is_is_read_with_skips_counted_per_slide(tmp_path, caplog):
    fake = write_fake_opensrh(tmp_path / "opensrh", size=16, patches=4, empty_slides=2, missing_patches=3)
    out = tmp_path / "study" / "manifest.csv"
    with caplog.at_level(logging.WARNING):
        assert main(["prepare", "--root", str(fake.root), "--out", str(out), "--check-images"]) == 0
    err = caplog.text
    df = read_manifest(out)
    assert len(df) == fake.usable_patches == 14 * 2 * 4 - 2 * 4 - 3
    for patient, slide in fake.empty_slides:
        assert f"{patient}-{slide}" not in set(df["slide"]) and f"{patient}-{slide} (class" in err
    assert "2 slide(s) without patches" in err and "3 of 104 listed patch file(s) missing" in err
    for rel in fake.missing_patches:
        patient, slide = rel.split("/")[1:3]
        assert f"{patient}-{slide}: 1 of 4" in err
    report = pd.read_csv(out.parent / "prepare_report.csv")
    assert list(report.columns) == ["patient", "slide", "label", "split", "listed", "missing", "used", "status"]
    assert len(report) == 14 * 2 and report["used"].sum() == len(df) and report["missing"].sum() == 3
    assert (report["status"] == "skipped: none listed").sum() == 2 and (report["status"] == "partial").sum() == 3
    assert report.set_index("slide")["used"].to_dict() == df.groupby("slide").size().reindex(report["slide"], fill_value=0).to_dict()


def test_missing_above_the_limit_or_strict_is_an_error_and_nothing_is_written(tmp_path, capsys):
    fake = write_fake_opensrh(tmp_path / "opensrh", size=16, patches=2, empty_slides=1, missing_patches=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "manifest.csv"
    # 3 of 54 listed patches missing (5.6 %): above the default limit of 5 %
    assert main(["prepare", "--root", str(fake.root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "3 listed patch file(s) missing" in err and "dataset.max_missing_fraction" in err
    assert list(out_dir.iterdir()) == []
    assert main(["prepare", "--root", str(fake.root), "--out", str(out), "--max-missing-fraction", "0.1", "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err and list(out_dir.iterdir()) == []
    assert main(["prepare", "--root", str(fake.root), "--out", str(out), "--max-missing-fraction", "0.1"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["manifest.csv", "prepare_report.csv"]


def test_a_patient_left_without_patches_is_skipped(tmp_path, caplog):
    fake = write_fake_opensrh(tmp_path / "opensrh", size=16, patches=1, missing_patches=2)
    meta_path = fake.root / "meta" / "opensrh.json"
    meta = json.loads(meta_path.read_text())
    lost = fake.split["train"][0]
    meta[lost]["slides"] = {}
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        df, report = read_opensrh(fake.root, max_missing_fraction=0.1)
    assert lost not in set(df["patient"]) and lost not in set(report["patient"])
    assert "1 patient(s) without any usable patch" in caplog.text and lost in caplog.text
    assert len(df) == fake.usable_patches - 2


def test_meta_files_can_be_named(tmp_path, capsys):
    """HLSS ships pruned metadata under other names; the names are options (dataset.meta_json / split_json)."""
    fake = write_fake_opensrh(tmp_path / "opensrh", size=16, patches=1)
    meta = fake.root / "meta"
    pruned = json.loads((meta / "opensrh.json").read_text())
    dropped = fake.split["train"][0]
    del pruned[dropped]
    (meta / "updated2_opensrh.json").write_text(json.dumps(pruned))
    split = dict(fake.split, train=fake.split["train"][1:])
    (meta / "updated2_train_val_split.json").write_text(json.dumps(split))
    out = tmp_path / "m.csv"
    assert main(["prepare", "--root", str(fake.root), "--out", str(out), "--meta-json", "updated2_opensrh.json",
                 "--split-json", "updated2_train_val_split.json"]) == 0
    assert dropped not in set(read_manifest(out)["patient"]) and len(read_manifest(out)) == 14 * 2 - 2
    assert main(["prepare", "--root", str(fake.root), "--out", str(out), "--meta-json", "pruned.json"]) == 2
    assert "meta/pruned.json: metadata file not found" in capsys.readouterr().err
    assert main(["prepare", "--folders", str(fake.root), "--out", str(out), "--meta-json", "x.json"]) == 2
    assert "--meta-json applies to --root only" in capsys.readouterr().err


def test_source_record_names_the_meta_files_and_their_hashes(tmp_path):
    import hashlib

    fake = write_fake_opensrh(tmp_path / "opensrh", size=16, patches=1)
    out, record = tmp_path / "study" / "manifest.csv", tmp_path / "study" / "dataset"
    assert main(["prepare", "--root", str(fake.root), "--out", str(out), "--record", str(record)]) == 0
    source = json.loads((record / "source.json").read_text())
    assert source["source"] == "opensrh" and source["root"] == str(fake.root.resolve())
    assert source["meta_json"] == "opensrh.json" and source["split_json"] == "train_val_split.json"
    meta = fake.root / "meta" / "opensrh.json"
    assert source["sha256"]["opensrh.json"] == hashlib.sha256(meta.read_bytes()).hexdigest()


def test_embedded_cohort_manifest_is_unchanged_by_the_report(cohort, tmp_path):
    """The default study's cohort has nothing to skip: the same manifest as before, and a report of full slides."""
    out = tmp_path / "manifest.csv"
    assert main(["prepare", "--root", str(cohort), "--out", str(out)]) == 0
    from hsat.data.manifest import write_manifest

    write_manifest(build_manifest(cohort), tmp_path / "direct.csv")
    assert out.read_bytes() == (tmp_path / "direct.csv").read_bytes()
    report = pd.read_csv(tmp_path / "prepare_report.csv")
    assert (report["status"] == "used").all() and report["used"].sum() == 7 * 2 * 2
