"""`hsat bench`: the report has every number, and the naive loop it compares with is the same attack.

Speed itself is never asserted here (that is what the benchmark measures); only that the
harness runs, reports finite positive ratios, and compares like with like.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import hsat.bench as bench_mod
from hsat.bench import bench_config, naive_adversarial_views, naive_step, run_benchmark
from hsat.errors import HSATError
from hsat.train import adversarial_views, hsat_step, make_optimizer

TINY = {
    "device": "cpu",
    "precision": "fp32",
    "seed": 0,
    "data": {"image_size": 16, "patients_per_batch": 2},
    "model": {"backbone": "test_resnet", "head_hidden": [32], "embed_dim": 16},
    "method": {"name": "hsat"},
    "attack": {"steps": 2},
}
TINY_COHORT = {"patients": 14, "slides": 2, "patches": 3, "size": 16}

ENTRY_KEYS = {
    "step_s", "floor_s", "ratio_to_floor", "naive_step_s", "ratio_to_naive", "data_wait_fraction",
    "eval_patches_per_s", "eval_ratio_to_floor", "eval_grid_patches_per_s", "peak_rss_mb", "meets_floor_target", "meets_naive_target", "meets_data_target",
    "backbone", "image_size", "precision", "channels_last", "compile",
}


def _positive_finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_run_benchmark_reports_every_number(tmp_path):
    from hsat.io import write_json

    report = run_benchmark(TINY, repeats=1, warmup=0, data_steps=1, data_workers=[0], eval_patches=4,
                           cohort=TINY_COHORT, workdir=tmp_path / "work")
    (entry,) = report["entries"]
    assert ENTRY_KEYS <= set(entry)
    for key in ("step_s", "floor_s", "naive_step_s", "ratio_to_floor", "ratio_to_naive", "eval_patches_per_s",
                "eval_ratio_to_floor", "eval_grid_patches_per_s", "peak_rss_mb"):
        assert _positive_finite(entry[key]), (key, entry[key])
    assert 0.0 <= entry["data_wait_fraction"] < 1.0
    # one round: the per-round ratios are the ratios of the reported seconds
    assert entry["ratio_to_floor"] == pytest.approx(entry["step_s"] / entry["floor_s"])
    assert entry["ratio_to_naive"] == pytest.approx(entry["step_s"] / entry["naive_step_s"])
    assert entry["floor_s"] == pytest.approx(entry["input_grad_passes_s"] + entry["train_pass_s"])
    assert (entry["backbone"], entry["image_size"], entry["pgd_steps"]) == ("test_resnet", 16, 2)
    for key in ("meets_floor_target", "meets_naive_target", "meets_data_target", "meets_memory_target"):
        assert isinstance(report[key], bool) and report[key] == entry[key]
    assert report["machine"]["device"] == "cpu" and report["machine"]["threads"] == 1
    assert report["machine"]["torch"] == torch.__version__
    assert report["synth"]["patches"] > 0 and math.isfinite(report["synth"]["patches_per_s"]) and report["synth"]["patches_per_s"] > 0
    # the report is plain JSON
    write_json(tmp_path / "bench.json", report)
    assert json.loads((tmp_path / "bench.json").read_text())["entries"][0]["step_s"] == entry["step_s"]


def test_cli_bench_writes_json_and_prints_a_table(tmp_path, monkeypatch, capsys):
    from hsat.cli import main

    monkeypatch.setattr(bench_mod, "COHORT", {**bench_mod.COHORT, **TINY_COHORT})
    out = tmp_path / "b.json"
    rc = main(["bench", "--json", str(out), "--repeats", "1", "--warmup", "0", "--data-steps", "1",
               "--eval-patches", "4", "--extra", "@24",
               "model.backbone=test_resnet", "model.head_hidden=[32]", "model.embed_dim=16",
               "data.image_size=16", "data.patients_per_batch=2", "attack.steps=1"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [(e["backbone"], e["image_size"]) for e in report["entries"]] == [("test_resnet", 16), ("test_resnet", 24)]
    assert set(report["entries"][0]["data_wait_by_workers"]) == {"0", "1"}  # the default's 1 worker, and 0 to compare
    table = capsys.readouterr().out
    assert "ratio_to_floor" in table and "test_resnet@24px" in table


def test_naive_loop_crafts_the_same_example_and_takes_the_same_step():
    """The comparison is fair: only where gradients go differs, not the attack or the update."""
    cfg = bench_config(TINY, ["attack.steps=3"])
    from hsat.models import model_from_config

    torch.manual_seed(0)
    ours = model_from_config(cfg)
    theirs = copy.deepcopy(ours)
    opt_ours, opt_theirs = make_optimizer(ours, cfg), make_optimizer(theirs, cfg)
    images = torch.rand(2, 2, 2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    shape, x = (2, 2, 2, 2), images.flatten(0, 3)
    kw = dict(method=cfg["method"], attack=cfg["attack"], eps=8.0)

    x_ours = adversarial_views(ours, x, shape, generator=torch.Generator().manual_seed(5), **kw)
    x_theirs = naive_adversarial_views(theirs, opt_theirs, x, shape, generator=torch.Generator().manual_seed(5), **kw)
    assert not torch.equal(x_ours, x)
    assert torch.allclose(x_ours, x_theirs, atol=1e-6)
    # the naive loop did build parameter gradients (and zeroed them): it is not our loop in disguise
    assert all(p.grad is None for p in theirs.parameters()) and all(p.requires_grad for p in theirs.parameters())

    a = hsat_step(ours, opt_ours, images, generator=torch.Generator().manual_seed(7), clean_weight=0.5, **kw)
    b = naive_step(theirs, opt_theirs, images, generator=torch.Generator().manual_seed(7), clean_weight=0.5, **kw)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    assert set(a.losses) == set(b.losses)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


def test_naive_loop_backpropagates_into_parameters(monkeypatch):
    """What makes it naive: each attack step's backward reaches the parameters."""
    cfg = bench_config(TINY)
    from hsat.models import model_from_config

    torch.manual_seed(0)
    model = model_from_config(cfg)
    opt = make_optimizer(model, cfg)
    seen = []
    real_zero = opt.zero_grad

    def zero_grad(set_to_none=True):
        seen.append(any(p.grad is not None for p in model.parameters()))
        real_zero(set_to_none=set_to_none)

    monkeypatch.setattr(opt, "zero_grad", zero_grad)
    x = torch.rand(16, 3, 16, 16)
    naive_adversarial_views(model, opt, x, (2, 2, 2, 2), method=cfg["method"], attack=cfg["attack"], eps=8.0)
    assert seen == [True] * cfg["attack"]["steps"]


def test_bench_config_reads_study_configs_and_refuses_bad_input(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("pretrain: {data: {image_size: 24}}\nmodels:\n  base: {method: {name: hidisc}}\n"
                     "  adv: {method: {name: hsat_patch}}\n")
    cfg = bench_config(study)
    assert cfg["method"]["name"] == "hsat_patch" and cfg["data"]["image_size"] == 24  # first adversarial model
    with pytest.raises(HSATError, match="not adversarial"):
        bench_config(None, ["method.name=hidisc"])
    with pytest.raises(HSATError, match="attack.steps"):
        bench_config(None, ["attack.steps=0"])
    with pytest.raises(HSATError, match="BACKBONE@PIXELS"):
        bench_mod._entry_config(bench_config(None), "resnet18@big")
    with pytest.raises(HSATError, match="repeats"):
        run_benchmark(TINY, repeats=0)


def test_bench_times_robust_dino_through_its_objective():
    """Any robust method is timed by the same step pretrain runs, with its own floor and naive
    loop (DINO: teacher forward, local crops, EMA update in both)."""
    cfg = bench_config(copy.deepcopy({**TINY, "method": {"name": "robust_dino", "dino": {"out_dim": 32, "hidden_dim": 16,
                                                                                         "bottleneck_dim": 8}},
                                      "data": {**TINY["data"], "local_crops": {"number": 2, "size": 8}}}))
    out = bench_mod.bench_step(cfg, torch.device("cpu"), warmup=0, repeats=1)
    for key in ("step_s", "floor_s", "naive_step_s", "ratio_to_floor", "ratio_to_naive"):
        assert _positive_finite(out[key]), (key, out[key])
    assert out["floor_s"] == pytest.approx(out["input_grad_passes_s"] + out["train_pass_s"])
    assert out["images_per_step"] == 2 * 2 * 2 * 2 + 2 * 2 * 2 * 2  # global views + local crops
