"""Manifest contract: validation messages, path resolution relative to the manifest, class ids,
the per-class split report and the parallel image check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hsat import CLASSES
from hsat.data import manifest as manifest_module
from hsat.data.manifest import (
    COLUMNS,
    check_images,
    class_names,
    format_split_report,
    label_ids,
    read_manifest,
    split_report,
    split_warnings,
    validate_manifest,
    write_manifest,
)
from hsat.errors import HSATError


def _png(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def png_manifest(tmp_path):
    rows = []
    for patient, split, label in (("007", "train", "tumour"), ("008", "val", "benign"), ("009", "train", "benign")):
        for s in range(2):
            p = _png(tmp_path / "imgs" / f"{patient}_{s}.png")
            rows.append((patient, f"{patient}-{s}", str(p), label, split))
    return pd.DataFrame(rows, columns=list(COLUMNS)).assign(stain="HE")


def test_tiny_manifest_roundtrip(tiny_manifest):
    df = read_manifest(tiny_manifest)
    assert list(df.columns[:5]) == list(COLUMNS)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p in df["path"])
    raw = pd.read_csv(tiny_manifest)
    assert not any(os.path.isabs(p) for p in raw["path"])  # stored relative to the manifest
    assert class_names(df) == list(CLASSES)
    ids = label_ids(df, class_names(df))
    assert ids.dtype == np.int64 and set(ids) == set(range(len(CLASSES)))


def test_user_png_manifest_validates_keeps_extra_and_ids(tmp_path, png_manifest):
    out = tmp_path / "sub" / "m.csv"
    write_manifest(png_manifest, out)
    text = out.read_text()
    assert "../imgs/007_0.png" in text
    df = read_manifest(out)
    assert df["patient"].tolist()[0] == "007"  # ids stay strings
    assert (df["stain"] == "HE").all()
    assert df["path"].tolist() == png_manifest["path"].tolist()
    assert class_names(df) == ["benign", "tumour"]
    assert label_ids(df, class_names(df)).tolist()[:2] == [1, 1]


def test_moved_study_folder_still_resolves(tmp_path, png_manifest):
    write_manifest(png_manifest, tmp_path / "m.csv")
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    os.rename(tmp_path, moved)
    try:
        df = read_manifest(moved / "m.csv")
        assert all(p.startswith(str(moved)) for p in df["path"])
    finally:
        os.rename(moved, tmp_path)


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda d: d.drop(columns="split"), r"missing manifest column.*split"),
        (lambda d: d.iloc[:0], "no rows"),
        (lambda d: d.assign(split=["train", "val", "test", "val", "train", "train"]), "unknown split.*test"),
        (lambda d: d.assign(split=["train", "val", "val", "val", "train", "train"]), "leakage.*007"),
        (lambda d: d.assign(slide=["007-0", "007-1", "007-0", "008-1", "009-0", "009-1"]), "slide 007-0 under patients.*008"),
        (lambda d: d.assign(label=["tumour", "", "benign", "benign", "benign", "benign"]), "empty 'label' on line.*3"),
        (lambda d: d.assign(path=d["path"].str.replace("008_1", "gone")), "not found.*gone.png"),
    ],
)
def test_validation_errors_name_source_and_offender(png_manifest, mutate, pattern):
    with pytest.raises(HSATError, match=pattern) as exc:
        validate_manifest(mutate(png_manifest), "my_manifest.csv")
    assert "my_manifest.csv" in str(exc.value)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(HSATError, match="absent.csv"):
        read_manifest(tmp_path / "absent.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(HSATError, match="empty.csv"):
        read_manifest(empty)


def test_label_ids_rejects_unknown(png_manifest):
    with pytest.raises(HSATError, match="tumour"):
        label_ids(png_manifest, ["benign"])


def test_split_report_counts_and_warnings(png_manifest):
    report = split_report(png_manifest)
    assert report.columns.tolist() == ["class", "train_patients", "train_patches", "val_patients", "val_patches"]
    assert report.to_dict("records") == [
        {"class": "benign", "train_patients": 1, "train_patches": 2, "val_patients": 1, "val_patches": 2},
        {"class": "tumour", "train_patients": 1, "train_patches": 2, "val_patients": 0, "val_patches": 0},
    ]
    assert split_warnings(png_manifest) == [
        "class 'tumour' has 1 patient: it is in train only; its validation accuracy cannot be measured"
    ]
    text = format_split_report(png_manifest)
    assert "benign" in text and text.splitlines()[-1].startswith("warning: class 'tumour'")


def test_split_warnings_val_only_and_several_patients(png_manifest):
    df = png_manifest.copy()
    df.loc[df["patient"] == "009", "split"] = "val"  # benign: 008 and 009 both in val
    extra = df[df["patient"] == "007"].assign(patient="010", slide=lambda d: d["slide"] + "x", path=lambda d: d["path"] + "x")
    df = pd.concat([df, extra], ignore_index=True)  # tumour: 007 and 010, both in train
    assert split_warnings(df) == [
        "class 'benign' has 2 patients, all in val only; no classifier fit on train can predict it",
        "class 'tumour' has 2 patients, all in train only; its validation accuracy cannot be measured",
    ]
    assert split_report(df.assign(split="train"))["val_patches"].tolist() == [0, 0]


def test_check_images_lists_every_unreadable_file(png_manifest):
    bad = png_manifest["path"].iloc[[1, 4]].tolist()
    Path(bad[0]).write_bytes(b"\x89PNG broken")
    Path(bad[1]).write_text("not an image")
    for workers in (1, 4):
        with pytest.raises(HSATError) as exc:
            check_images(png_manifest, "m.csv", workers=workers)
        msg = str(exc.value)
        assert msg.startswith("m.csv: 2 image file(s) cannot be read")
        assert f"patient 007, slide 007-1: {bad[0]}" in msg and f"patient 009, slide 009-0: {bad[1]}" in msg
        assert msg.index(bad[0]) < msg.index(bad[1])  # manifest order, whatever the threads did


def test_check_images_passes_good_files_and_rejects_non_srh(png_manifest):
    check_images(png_manifest, "m.csv", workers=3)
    with pytest.raises(HSATError, match="007_0.png: cannot read TIFF.*not a TIFF"):
        check_images(png_manifest, "m.csv", srh_only=True)


def test_check_images_stops_after_many_failures(png_manifest, monkeypatch):
    for p in png_manifest["path"]:
        Path(p).write_text("broken")
    monkeypatch.setattr(manifest_module, "_CHECK_BATCH", 1)
    monkeypatch.setattr(manifest_module, "_CHECK_STOP_AFTER", 2)
    with pytest.raises(HSATError, match=r"2\+ \(stopped reading after 2\) image file"):
        check_images(png_manifest, "m.csv", workers=1)


def _run(**data):
    from hsat.config import validate
    from hsat.methods import resolve_method

    cfg = validate({"data": data}, "run")
    cfg["method"] = resolve_method(cfg["method"])
    return cfg


def test_run_data_errors_name_the_key_and_what_to_set(png_manifest):
    from hsat.data.manifest import run_data_errors

    # 2 training patients, 2 classes: the default batch of 8 takes both (nothing to set)
    assert run_data_errors(_run(), png_manifest) == []
    assert run_data_errors(_run(patients_per_batch=2), png_manifest, nproc=2) == []
    [msg] = run_data_errors(_run(), png_manifest, nproc=3)
    assert "data.patients_per_batch=8 (2 with the manifest's 2 training patients)" in msg
    assert "launcher.nproc_per_node=3" in msg and "use at most 2 processes" in msg
    three = pd.concat([png_manifest, png_manifest[png_manifest.patient == "009"].assign(
        patient="010", slide=lambda d: d.slide + "b")])
    [msg] = run_data_errors(_run(patients_per_batch=4), three, nproc=2)
    assert "set pretrain.data.patients_per_batch: 2" in msg
    # across nodes the batch is split over every node's processes
    assert run_data_errors(_run(patients_per_batch=2), png_manifest, nproc=1, nodes=2) == []
    [msg] = run_data_errors(_run(patients_per_batch=2), png_manifest, nproc=2, nodes=2)
    assert "the 4 processes (launcher.nodes=2 x launcher.nproc_per_node=2)" in msg and "use at most 2 processes" in msg
    one = png_manifest[png_manifest.patient != "009"]
    assert any("1 training patient(s)" in m for m in run_data_errors(_run(), one))
    assert any("one class" in m for m in run_data_errors(_run(), png_manifest.assign(label="benign")))


def test_study_data_errors_checks_every_model_against_the_study_manifest(png_manifest, tmp_path):
    from hsat.config import resolve_study
    from hsat.data.manifest import study_data_errors

    srh = Path(__file__).resolve().parents[1] / "config" / "attributes" / "srh.yaml"
    write_manifest(png_manifest, tmp_path / "m.csv")
    overlay = {"dataset": {"manifest": str(tmp_path / "m.csv")},
               "models": {"plain": {"method": {"name": "hidisc"}},
                          "lang": {"method": {"name": "hlss", "hlss": {"descriptions": str(srh)}}}}}
    study, _ = resolve_study(Path(__file__).resolve().parents[1] / "config" / "config.yaml", [overlay])
    [msg] = study_data_errors(study)
    assert msg.startswith(f"{tmp_path / 'm.csv'}: method.hlss.descriptions: {srh}") and msg.endswith("(models: lang)")
    assert "['benign', 'tumour']" in msg and "set method.hlss.descriptions" in msg
    del overlay["models"]["lang"]
    study, _ = resolve_study(Path(__file__).resolve().parents[1] / "config" / "config.yaml", [overlay])
    assert study_data_errors(study) == []


def test_result_files_name_patches_as_the_manifest_stores_them(tmp_path):
    """Relative to the manifest's folder: the same in every copy of a study, wherever it lies."""
    from hsat.data.manifest import same_patch, stored_paths

    for root in (tmp_path / "a", tmp_path / "b" / "deeper"):
        assert stored_paths([str(root / "dataset" / "p1.tif")], root / "manifest.csv") == ["dataset/p1.tif"]
    assert same_patch("dataset/p1.tif", "dataset/p1.tif")
    assert same_patch("/old/study/dataset/p1.tif", "dataset/p1.tif")  # a file written with absolute paths
    assert not same_patch("dataset/p1.tif", "dataset/p2.tif")
    assert not same_patch("/old/study/dataset/xp1.tif", "p1.tif")  # whole path components only
