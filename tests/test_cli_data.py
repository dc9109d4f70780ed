"""`hsat synth` then `hsat prepare` end to end, and a user manifest of PNGs through the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hsat.cli import main
from hsat.data.manifest import COLUMNS, read_manifest


def test_synth_then_prepare(tmp_path, capsys):
    cohort, out = tmp_path / "cohort", tmp_path / "study" / "manifest.csv"
    assert main(["synth", "--out", str(cohort), "--patients", "7", "--slides", "2", "--patches", "3", "--size", "16"]) == 0
    assert main(["prepare", "--root", str(cohort), "--out", str(out), "--check-images"]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "val:" in printed and "patches" in printed
    # the per-class report: the 7 classes have one patient each, so each is in train only
    assert "train_patients" in printed and "val_patches" in printed
    assert printed.count("warning: class ") == 7 and "warning: class 'schwan' has 1 patient" in printed
    df = read_manifest(out)
    assert len(df) == 7 * 2 * 3 and df["label"].nunique() == 7
    assert pd.read_csv(out)["path"].str.startswith("../cohort/").all()


def test_synth_refuses_foreign_dir(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert main(["synth", "--out", str(tmp_path), "--patients", "7", "--patches", "1", "--size", "16"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_synth_names_a_set_value_that_is_not_yaml(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["synth", "--out", str(out), "--patients", "7", "--size", "16", "--set", "intensity_gain=[1"]) == 2
    assert "--set 'intensity_gain=[1'" in capsys.readouterr().err
    assert not out.exists()


def _png_rows(tmp_path):
    rows = []
    for i, (patient, split) in enumerate((("A", "train"), ("B", "val"), ("C", "train"))):
        path = tmp_path / "imgs" / f"{patient}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path)
        rows.append({"patient": patient, "slide": f"{patient}1", "path": f"imgs/{patient}.png", "label": "x" if i else "y", "split": split})
    return pd.DataFrame(rows)


def test_prepare_user_png_manifest(tmp_path):
    src = tmp_path / "mine.csv"
    _png_rows(tmp_path).to_csv(src, index=False)
    out = tmp_path / "out" / "manifest.csv"
    assert main(["prepare", "--manifest", str(src), "--out", str(out), "--check-images"]) == 0
    written = pd.read_csv(out)
    assert list(written.columns) == list(COLUMNS)
    assert written["path"].tolist() == ["../imgs/A.png", "../imgs/B.png", "../imgs/C.png"]
    assert len(read_manifest(out)) == 3


def test_prepare_bad_user_manifest_writes_nothing(tmp_path, capsys):
    df = _png_rows(tmp_path)
    df.loc[1, "patient"] = "A"  # A is now in train and val
    src = tmp_path / "mine.csv"
    df.to_csv(src, index=False)
    out = tmp_path / "out" / "manifest.csv"
    assert main(["prepare", "--manifest", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mine.csv" in err and "A" in err and "leakage" in err
    assert not out.exists()


def test_prepare_corrupt_png_with_check_images(tmp_path, capsys):
    df = _png_rows(tmp_path)
    (tmp_path / "imgs" / "B.png").write_bytes(b"\x89PNG broken")
    src = tmp_path / "mine.csv"
    df.to_csv(src, index=False)
    out = tmp_path / "manifest.csv"
    assert main(["prepare", "--manifest", str(src), "--out", str(out), "--check-images"]) == 2
    assert "B.png" in capsys.readouterr().err
    assert not out.exists()


def test_prepare_checks_images_by_default_and_opts_out(tmp_path, capsys):
    df = _png_rows(tmp_path)
    bad = tmp_path / "imgs" / "C.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    src = tmp_path / "mine.csv"
    df.to_csv(src, index=False)
    out = tmp_path / "manifest.csv"
    assert main(["prepare", "--manifest", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mine.csv" in err and str(bad) in err and "patient C" in err
    assert not out.exists()
    assert main(["prepare", "--manifest", str(src), "--out", str(out), "--no-check-images"]) == 0
    assert len(read_manifest(out)) == 3


def test_prepare_root_checks_images_by_default(tmp_path, capsys):
    cohort, out = tmp_path / "cohort", tmp_path / "manifest.csv"
    assert main(["synth", "--out", str(cohort), "--patients", "7", "--slides", "1", "--patches", "2", "--size", "16"]) == 0
    patch = sorted((cohort / "studies").rglob("*.tif"))[0]
    patch.write_bytes(patch.read_bytes()[:40])
    assert main(["prepare", "--root", str(cohort), "--out", str(out)]) == 2
    assert patch.name in capsys.readouterr().err and not out.exists()
    assert main(["prepare", "--root", str(cohort), "--out", str(out), "--no-check-images"]) == 0


def test_prepare_sources_are_exclusive_and_split_flags_need_folders(tmp_path, capsys):
    src = tmp_path / "mine.csv"
    _png_rows(tmp_path).to_csv(src, index=False)
    out = tmp_path / "manifest.csv"
    for other in (["--root", str(tmp_path)], ["--folders", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            main(["prepare", "--manifest", str(src), *other, "--out", str(out)])
        assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    for flag in (["--val-fraction", "0.5"], ["--seed", "1"]):
        assert main(["prepare", "--manifest", str(src), "--out", str(out), *flag]) == 2
        assert "--folders only" in capsys.readouterr().err
    assert not out.exists()
