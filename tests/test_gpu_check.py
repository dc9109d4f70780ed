"""`make gpu-check` (tests/gpu_check.py) where there is no GPU: it says so and exits 77, and its
dry path (`--device cpu`: the same code at 64 px, fp32, no compile) measures every backbone,
runs the one-process DDP pretraining (gloo) and the OOM back-off, and writes its JSON."""

from __future__ import annotations

import json

import pytest
import torch

import gpu_check


def test_without_a_gpu_it_says_so_and_exits_77(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: `make gpu-check` runs the real check")
    assert gpu_check.main(["--device", "cuda"]) == gpu_check.EXIT_SKIP
    assert "SKIP: no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(1800)
def test_dry_path_on_the_cpu_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--skip-dag", "--steps", "3", "--out", str(out),
                         "--workdir", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    assert rc == 0, report["failures"]
    assert set(report["train_images_per_s"]) == set(report["attack_images_per_s"]) == set(gpu_check.BACKBONE_MODELS)
    assert all(v > 0 for v in [*report["train_images_per_s"].values(), *report["attack_images_per_s"].values()])
    assert report["ddp"]["ok"] and (tmp_path / "work" / "ddp" / "model.safetensors").is_file()
    # The dry path's CPU "runs out of memory" above 2 rows: 8 rows went through in pieces of 2.
    assert report["oom_backoff"] == {"ok": True, "batch": 8, "pieces_of": 2}
    assert report["precision"] == "fp32" and report["compile"] is False and report["image_size"] == 64
