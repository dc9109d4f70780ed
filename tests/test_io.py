"""hsat.io's atomic writers: results appear whole or not at all, with the mode the umask gives."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from hsat.io import atomic_path, make_temp_dir, write_csv, write_json, write_text, write_yaml


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_get_the_users_umask(tmp_path, umask):
    out = tmp_path / "results"
    write_text(out / "a.txt", "x\n")
    write_json(out / "b.json", {"a": 1})
    write_yaml(out / "c.yaml", {"a": 1})
    write_csv(out / "d.csv", pd.DataFrame({"a": [1]}))
    with atomic_path(out / "e.bin") as tmp:
        tmp.write_bytes(b"\0")
    for name in ("a.txt", "b.json", "c.yaml", "d.csv", "e.bin"):
        assert _mode(out / name) == 0o666 & ~umask, (name, oct(_mode(out / name)))
    assert _mode(make_temp_dir(out, prefix=".x-")) == 0o777 & ~umask
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".x-")) == [
        "a.txt", "b.json", "c.yaml", "d.csv", "e.bin"]  # no temporary file left


def test_a_replaced_file_takes_the_umask_not_the_old_mode(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("old")
    path.chmod(0o600)
    old = os.umask(0o022)
    try:
        write_text(path, "new")
    finally:
        os.umask(old)
    assert path.read_text() == "new" and _mode(path) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "t.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_the_synthetic_cohort_folder_gets_the_users_umask(tmp_path):
    from hsat.data.synthetic import synthesize_cohort

    old = os.umask(0o022)
    try:
        out = synthesize_cohort(tmp_path / "dataset", patients=7, slides=1, patches=1, size=16, seed=0)
    finally:
        os.umask(old)
    assert _mode(out) == 0o755 and _mode(out / "meta") == 0o755
    assert _mode(out / "meta" / "opensrh.json") == 0o644
