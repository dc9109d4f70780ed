"""`make slurm-check` in the suite: the study through profiles/slurm on a real one-node SLURM
(tests/slurm_check.py), skipped with its reason where SLURM cannot be installed or started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).with_name("slurm_check.py")


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_slurm_check():
    proc = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=1450)
    out = proc.stdout + proc.stderr
    if proc.returncode == 77:
        reasons = [line for line in out.splitlines() if line.startswith("SKIP: ")]
        pytest.skip(reasons[-1] if reasons else "slurm-check skipped")
    assert proc.returncode == 0, out[-6000:]
    assert "slurm-check passed" in out
