"""`hsat prepare --folders`: both layouts, the stratified patient split, every bad tree, image checks."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from hsat.cli import main
from hsat.data.folders import manifest_from_folders
from hsat.data.manifest import read_manifest, split_report
from hsat.errors import HSATError


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)
    return path


def _tree(root: Path, classes: dict[str, int], slides: int = 0, images: int = 2) -> Path:
    """`classes[c]` patients per class; `slides` 0 = flat layout, else that many slide folders."""
    for c, n in classes.items():
        for p in range(n):
            patient = root / c / f"{c}{p:02d}"
            folders = [patient] if slides == 0 else [patient / f"s{s}" for s in range(slides)]
            for folder in folders:
                for i in range(images):
                    _png(folder / f"patch{i}.png", 10 * i)
    return root


def _prepare(root, out, *extra) -> int:
    return main(["prepare", "--folders", str(root), "--out", str(out), *extra])


# ----------------------------------------------------------------------------- layouts


def test_nested_layout_rows_and_slide_ids(tmp_path):
    root = _tree(tmp_path / "tree", {"glioma": 3, "normal": 2}, slides=2, images=2)
    df = manifest_from_folders(root)
    assert len(df) == 5 * 2 * 2
    assert set(df["label"]) == {"glioma", "normal"}
    # slide folders "s0", "s1" repeat across patients; the ids are qualified by the patient
    assert df["slide"].nunique() == 10
    assert set(df[df["patient"] == "glioma00"]["slide"]) == {"glioma00-s0", "glioma00-s1"}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert (df.groupby("patient")["split"].nunique() == 1).all()


def test_flat_layout_slide_is_patient_and_suffixes_any_case(tmp_path):
    root = tmp_path / "tree"
    _png(root / "a" / "p1" / "x.PNG")
    _png(root / "a" / "p1" / "y.Jpeg")
    tifffile.imwrite(root / "a" / "p1" / "z.TIF", np.zeros((6, 6, 3), np.uint8), photometric="rgb")
    _png(root / "b" / "p2" / "x.jpg")
    df = manifest_from_folders(root)
    assert sorted(Path(p).name for p in df["path"]) == ["x.PNG", "x.jpg", "y.Jpeg", "z.TIF"]
    assert set(zip(df["patient"], df["slide"])) == {("p1", "p1"), ("p2", "p2")}


def test_both_layouts_in_one_tree_through_cli(tmp_path, capsys):
    root = _tree(tmp_path / "tree", {"a": 2}, slides=2)
    _tree(root, {"b": 2}, slides=0)
    out = tmp_path / "study" / "manifest.csv"
    assert _prepare(root, out) == 0
    df = read_manifest(out)
    assert set(df[df["label"] == "b"]["slide"]) == {"b00", "b01"}
    assert set(df[df["label"] == "a"]["slide"]) == {"a00-s0", "a00-s1", "a01-s0", "a01-s1"}
    assert pd.read_csv(out)["path"].str.startswith("../tree/").all()  # relative to the manifest
    printed = capsys.readouterr().out
    assert "train_patients" in printed and "val_patches" in printed


def test_hidden_entries_skipped_and_non_images_warned(tmp_path, caplog):
    root = _tree(tmp_path / "tree", {"a": 2, "b": 2})
    (root / "a" / "a00" / ".DS_Store").write_text("x")
    (root / "a" / "a00" / ".cache").mkdir()  # a hidden folder is not a slide folder: no mixed layout
    _png(root / "a" / "a00" / ".cache" / "thumb.png")
    (root / ".git").mkdir()  # not a class
    (root / "b" / "b01" / "notes.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        df = manifest_from_folders(root)
    assert set(df["label"]) == {"a", "b"} and len(df) == 8
    assert not df["path"].str.contains("thumb|notes|DS_Store").any()
    assert "notes.txt" in caplog.text and "DS_Store" not in caplog.text


# ----------------------------------------------------------------------------- the split


def test_one_patient_class_is_train_only_and_named_in_warning(tmp_path, capsys, caplog):
    root = _tree(tmp_path / "tree", {"common": 4, "rare": 1, "other": 3})
    out = tmp_path / "manifest.csv"
    with caplog.at_level(logging.WARNING):
        assert _prepare(root, out) == 0
    df = read_manifest(out)
    assert set(df[df["label"] == "rare"]["split"]) == {"train"}
    printed = capsys.readouterr().out
    warning = "class 'rare' has 1 patient: it is in train only; its validation accuracy cannot be measured"
    assert warning in printed and warning in caplog.text
    assert "'common'" not in caplog.text and "'other'" not in caplog.text
    report = split_report(df).set_index("class")
    assert report.loc["rare"].tolist() == [1, 2, 0, 0]
    assert report.loc["common", "val_patients"] == 1 and report.loc["common", "train_patches"] == 6


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 9])
def test_stratified_each_class_in_both_splits(tmp_path, n):
    root = _tree(tmp_path / "tree", {"a": n, "b": 2, "c": 7}, images=1)
    df = manifest_from_folders(root)
    per_class = df.groupby(["label", "split"])["patient"].nunique().unstack(fill_value=0)
    assert (per_class["val"] >= 1).all() and (per_class["train"] >= 1).all()
    assert per_class.loc["a", "val"] == min(max(round(0.33 * n), 1), n - 1)
    assert per_class.loc["c", "val"] == 2


def test_large_val_fraction_never_takes_a_whole_class(tmp_path):
    root = _tree(tmp_path / "tree", {"a": 2, "b": 5, "c": 1}, images=1)
    df = manifest_from_folders(root, val_fraction=0.9)
    per_class = df.groupby(["label", "split"])["patient"].nunique().unstack(fill_value=0)
    assert per_class.loc["a"].tolist() == [1, 1] and per_class.loc["b"].tolist() == [1, 4]
    assert per_class.loc["c"].tolist() == [1, 0]  # (train, val): one patient stays in train


def test_split_deterministic_for_seed_and_changes_with_it(tmp_path):
    root = _tree(tmp_path / "tree", {"a": 10, "b": 10}, images=1)

    def val_patients(**kw):
        df = manifest_from_folders(root, **kw)
        return tuple(sorted(df[df["split"] == "val"]["patient"]))

    assert val_patients(seed=3) == val_patients(seed=3)
    assert len({val_patients(seed=s) for s in range(5)}) > 1
    assert len(val_patients(seed=0, val_fraction=0.5)) == 10


def test_val_fraction_and_seed_through_cli(tmp_path):
    root = _tree(tmp_path / "tree", {"a": 10}, images=1)
    out1, out2 = tmp_path / "m1.csv", tmp_path / "m2.csv"
    assert _prepare(root, out1, "--val-fraction", "0.5", "--seed", "7") == 0
    assert _prepare(root, out2, "--val-fraction", "0.5", "--seed", "7") == 0
    assert out1.read_text() == out2.read_text()
    assert (read_manifest(out1)["split"] == "val").sum() == 5


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_bad_val_fraction(tmp_path, capsys, fraction):
    root = _tree(tmp_path / "tree", {"a": 2})
    with pytest.raises(HSATError, match="--val-fraction"):
        manifest_from_folders(root, val_fraction=fraction)
    out = tmp_path / "m.csv"
    assert _prepare(root, out, "--val-fraction", str(fraction)) == 2
    assert "--val-fraction" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------- bad trees


def _missing_root(root):
    return root / "nope", [str(root / "nope"), "not found"]


def _root_is_file(root):
    root.mkdir()
    (root / "data.png").write_text("x")
    return root / "data.png", [str(root / "data.png"), "not a directory"]


def _no_class_folders(root):
    root.mkdir()
    (root / "README.txt").write_text("x")
    return root, [str(root), "no class folders"]


def _images_in_root(root):
    _tree(root, {"a": 2})
    _png(root / "stray.png")
    return root, [str(root), "stray.png", "directly in the root"]


def _images_in_class_folder(root):
    _tree(root, {"a": 2, "b": 2})
    _png(root / "b" / "patch.png")
    return root, [str(root / "b"), "patch.png", "patient folders"]


def _empty_class_folder(root):
    _tree(root, {"a": 2})
    (root / "b").mkdir()
    return root, [str(root / "b"), "no patient folders"]


def _patient_without_images(root):
    _tree(root, {"a": 2, "b": 2})
    (root / "b" / "b99").mkdir()
    (root / "b" / "b99" / "scan.ndpi").write_text("x")
    return root, [str(root / "b" / "b99"), "no images", "scan.ndpi"]


def _slide_without_images(root):
    _tree(root, {"a": 2, "b": 2}, slides=2)
    for p in (root / "a" / "a01" / "s1").iterdir():
        p.unlink()
    return root, [str(root / "a" / "a01" / "s1"), "no images"]


def _mixed_layout(root):
    _tree(root, {"a": 2, "b": 2}, slides=2)
    _png(root / "a" / "a00" / "loose.png")
    return root, [str(root / "a" / "a00"), "loose.png", "s0", "both image files", "one layout per patient"]


def _folder_below_slide(root):
    _tree(root, {"a": 2, "b": 2}, slides=1)
    _png(root / "a" / "a00" / "s0" / "tiles" / "x.png")
    return root, [str(root / "a" / "a00" / "s0"), "tiles"]


def _patient_under_two_classes(root):
    _tree(root, {"a": 2, "b": 2})
    _png(root / "b" / "a01" / "x.png")
    return root, ["a01", str(root / "a" / "a01"), str(root / "b" / "a01"), "more than one class"]


BAD_TREES = {
    "root missing": _missing_root,
    "root not a directory": _root_is_file,
    "no class folders": _no_class_folders,
    "images directly in root": _images_in_root,
    "images directly in a class folder": _images_in_class_folder,
    "empty class folder": _empty_class_folder,
    "patient folder without images": _patient_without_images,
    "slide folder without images": _slide_without_images,
    "patient folder mixing the layouts": _mixed_layout,
    "folder below a slide folder": _folder_below_slide,
    "patient under two classes": _patient_under_two_classes,
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_bad_tree_exit_2_names_path_writes_nothing(tmp_path, capsys, case):
    root, expected = BAD_TREES[case](tmp_path / "tree")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert _prepare(root, out_dir / "manifest.csv") == 2
    err = capsys.readouterr().err
    for piece in expected:
        assert piece in err, f"{piece!r} not in: {err}"
    assert list(out_dir.iterdir()) == []


# ----------------------------------------------------------------------------- image checks


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _noisy_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def _truncated_png(root):
    path = _noisy_png(root / "a" / "a01" / "bad.png")
    _truncate(path)
    return path, "truncated"


def _truncated_tiff(root):
    path = root / "b" / "b00" / "bad.tiff"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8), photometric="rgb")
    _truncate(path)
    return path, "truncated"


def _not_an_image(root):
    path = root / "a" / "a00" / "bad.jpg"
    path.write_text("this is not a JPEG")
    return path, "cannot identify image"


def _wrong_dtype(root):
    path = root / "b" / "b01" / "bad.tif"
    tifffile.imwrite(path, np.ones((8, 8), np.int32))
    return path, "dtype int32"


@pytest.mark.parametrize("damage", [_truncated_png, _truncated_tiff, _not_an_image, _wrong_dtype])
def test_bad_image_fails_prepare_by_default(tmp_path, capsys, damage):
    root = _tree(tmp_path / "tree", {"a": 2, "b": 2})
    path, why = damage(root)
    out = tmp_path / "manifest.csv"
    assert _prepare(root, out) == 2
    err = capsys.readouterr().err
    assert str(path) in err and why in err and "1 image file(s) cannot be read" in err
    assert not out.exists()
    # the opt-out skips the read: the same tree then prepares
    assert _prepare(root, out, "--no-check-images") == 0
    assert str(path) in read_manifest(out)["path"].tolist()


def test_check_images_flag_still_accepted(tmp_path):
    root = _tree(tmp_path / "tree", {"a": 2})
    _truncated_png(root)
    assert _prepare(root, tmp_path / "m.csv", "--check-images") == 2
    with pytest.raises(SystemExit) as exc:  # contradictory flags are an argparse error
        _prepare(root, tmp_path / "m.csv", "--check-images", "--no-check-images")
    assert exc.value.code == 2
