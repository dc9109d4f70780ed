"""Shared fixtures: a tiny embedded cohort and its manifest, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network; make hub libraries fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """An embedded SRH-like cohort: 7 classes x 2 patients, 2 slides, 6 patches of 32 px."""
    from hsat.data.synthetic import synthesize_cohort

    root = tmp_path_factory.mktemp("cohort")
    synthesize_cohort(root, patients=14, slides=2, patches=6, size=32, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_manifest(tiny_cohort: Path, tmp_path_factory) -> Path:
    """Manifest CSV of `tiny_cohort` (paths relative to the manifest's folder)."""
    from hsat.data.manifest import write_manifest
    from hsat.data.opensrh import build_manifest

    out = tmp_path_factory.mktemp("manifest") / "manifest.csv"
    write_manifest(build_manifest(tiny_cohort), out)
    return out


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """Process-wide torch settings a test (or the library under it, e.g. pretrain's `threads`)
    changes are put back, so a test's outcome never depends on which tests ran before it."""
    import torch

    saved = (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
             torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.enabled,
             torch.get_float32_matmul_precision())
    yield
    threads, grad, dtype, deterministic, mkldnn, matmul = saved
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(grad)
    torch.set_default_dtype(dtype)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.mkldnn.enabled = mkldnn
    torch.set_float32_matmul_precision(matmul)
