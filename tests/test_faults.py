"""Faults end in a clear message: a full disk is one line naming the file and the cause, exit
status 74 (hsat.io.WRITE_ERROR), and nothing half-written is left behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hsat.io import WRITE_ERROR, atomic_path, describe_os_error, remove_temporaries, write_error

SRC = Path(__file__).resolve().parents[1] / "src"
# A seconds-long pretraining: its checkpoint (~4.6 MB with the optimiser state) does not fit on
# the 4 MiB disk below, while its config, log and the job's log do.
TINY_RUN = ["model.backbone=test_resnet", "model.head_hidden=[32]", "model.embed_dim=16", "data.image_size=16",
            "data.patients_per_batch=2", "data.num_workers=0", "attack.steps=1", "train.steps=1",
            "device=cpu", "threads=1", "precision=fp32"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs: a disk that really fills. Mounting needs root (CI containers run as root)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, and mounting one needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _fill(disk: Path) -> None:
    """Write a filler file until the disk refuses."""
    with open(disk / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert os.statvfs(disk).f_bavail == 0


def test_pretraining_on_a_full_disk_says_so_in_the_jobs_log(small_disk, tiny_manifest, tmp_path):
    """As the workflow runs it: the run folder and the job's log on the disk that fills."""
    run = small_disk / "runs" / "hsat"
    log = small_disk / "logs" / "pretrain" / "hsat.log"
    log.parent.mkdir(parents=True)
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "hsat", "pretrain", "--manifest", str(tiny_manifest), "--out", str(run),
                               "--live-dir", str(tmp_path / "live"), *TINY_RUN],
                              stdout=fh, stderr=subprocess.STDOUT, env=_env(), timeout=600)
    text = log.read_text()
    assert proc.returncode == WRITE_ERROR, text[-3000:]
    assert text.splitlines()[-1] == (f"hsat pretrain: error: {run / 'checkpoint.pt'}: No space left on device (ENOSPC); "
                                     "free disk space, then rerun the same command (finished work is kept)")
    assert "Traceback" not in text and "inline_container" not in text
    # nothing half-written: no temporary file, no checkpoint or weights; what is there is whole
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.startswith(".")] and "checkpoint.pt" not in names and "model.safetensors" not in names
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 1
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


def test_a_report_on_a_full_disk_exits_74_and_leaves_nothing(small_disk, tmp_path):
    part = tmp_path / "whitebox_m.csv"
    pd.DataFrame({"model": ["m"] * 500, "acc": range(500)}).to_csv(part, index=False)
    _fill(small_disk)
    out = small_disk / "whitebox.csv"
    proc = subprocess.run([sys.executable, "-m", "hsat", "report", "collect", "--out", str(out), str(part)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == WRITE_ERROR
    assert proc.stderr.strip().splitlines() == [f"hsat report: error: {out}: No space left on device (ENOSPC); "
                                                "free disk space, then rerun the same command (finished work is kept)"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_write_errors_name_the_file_whatever_library_failed(tmp_path):
    # safetensors (Rust) reports the errno in its message only
    err = write_error(Exception("Error while serializing: I/O error: No space left on device (os error 28)"), "x.st")
    assert (err.errno, err.filename) == (errno.ENOSPC, "x.st")
    assert describe_os_error(err).startswith("x.st: No space left on device (ENOSPC); free disk space")
    assert write_error(ValueError("a bug"), "x") is None
    # an OSError inside an atomic write is re-raised naming the target, the temporary file gone
    target = tmp_path / "out.csv"
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    assert info.value.filename == str(target) and info.value.errno == errno.EROFS and not tmp.exists()
    assert list(tmp_path.iterdir()) == []


def test_what_killed_writes_leave_is_found_and_nothing_else(tmp_path):
    """A SIGKILL during an atomic write leaves its temporary file; a workflow's start removes
    those of the outputs it will write (rules/common.smk, onstart), and only those."""
    import tempfile

    (tmp_path / "whitebox").mkdir()
    left = {tmp_path / "whitebox" / "hsat.csv": tempfile.mkstemp(dir=tmp_path / "whitebox", prefix=".hsat.csv.", suffix=".csv")[1],
            tmp_path / "checkpoint.pt": tempfile.mkstemp(dir=tmp_path, prefix=".checkpoint.pt.", suffix=".pt")[1],
            tmp_path / "notes": tempfile.mkstemp(dir=tmp_path, prefix=".notes.", suffix=".tmp")[1]}
    kept = [tmp_path / ".checkpoint.pt.notes", tmp_path / "whitebox" / "hsat.csv", tmp_path / ".hidden.abcdefgh.txt",
            Path(tempfile.mkstemp(dir=tmp_path / "whitebox", prefix=".hidisc.csv.", suffix=".csv")[1])]  # not asked for
    for path in kept:
        path.write_text("x")
    for target, tmp in left.items():
        assert remove_temporaries(target) == [Path(tmp)]
    assert all(p.exists() for p in kept) and not any(Path(p).exists() for p in left.values())


def test_a_cohort_build_cut_short_leaves_nothing_after_the_next_start(tmp_path):
    """A synthetic cohort is built in a folder beside its target and renamed into place, an old
    one moved aside first: a kill in between leaves those folders; the next `hsat synth` (and a
    workflow's start: remove_temporaries of its outputs) removes them, and only them."""
    from hsat.data.synthetic import synthesize_cohort
    from hsat.io import make_temp_dir, temporary_dir_prefix

    out = tmp_path / "dataset"
    building = make_temp_dir(tmp_path, prefix=temporary_dir_prefix(out))
    (building / "studies" / "SYN001").mkdir(parents=True)
    moved_aside = make_temp_dir(tmp_path, prefix=temporary_dir_prefix(out, "old"))
    kept = [tmp_path / ".dataset.tmp-mine", tmp_path / ".cohort.tmp-0123456789ab", tmp_path / ".dataset.old-12345"]
    for path in kept:
        path.mkdir()
    assert remove_temporaries(out) == sorted([building, moved_aside])
    assert sorted(tmp_path.iterdir()) == sorted(kept)

    building = make_temp_dir(tmp_path, prefix=temporary_dir_prefix(out))
    synthesize_cohort(out, patients=7, slides=1, patches=1, size=8)
    synthesize_cohort(out, patients=7, slides=1, patches=1, size=8, seed=1)  # replaces the first: moves it aside
    assert sorted(tmp_path.iterdir()) == sorted([*kept, out]) and (out / "meta" / "synthetic.json").is_file()
