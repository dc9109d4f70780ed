"""Manifest contract: validation messages, path resolution relative to the manifest, class ids."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hsat import CLASSES
from hsat.data.manifest import COLUMNS, class_names, label_ids, read_manifest, validate_manifest, write_manifest
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
