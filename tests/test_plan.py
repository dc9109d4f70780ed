"""`hsat plan`: GPU-hours follow the study's sizes (every expectation is a ratio of the config's
own values, never a hard-coded total)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from hsat.cli import main
from hsat.config import resolve_study
from hsat.errors import HSATError
from hsat.plan import DEFAULT_THROUGHPUT, FP32_FACTOR, plan_study, throughputs_from_bench

REPO = Path(__file__).resolve().parents[1]
PATCHES = {"train": 4000, "val": 1000}


@pytest.fixture(scope="module")
def study() -> dict:
    """The paper's OpenSRH study (an overlay on the default study), as `hsat plan` resolves it."""
    cfg, _ = resolve_study(REPO / "config" / "config.yaml", [REPO / "config" / "opensrh.yaml"])
    return cfg


def _hours(plan: pd.DataFrame, stage: str, model: str | None = None) -> float:
    rows = plan[plan["stage"] == stage]
    if model is not None:
        rows = rows[rows["model"] == model]
    assert not rows.empty, (stage, model)
    return float(rows["gpu_hours"].sum())


def test_every_model_is_planned_in_every_stage_it_runs(study):
    plan = plan_study(study, PATCHES)
    models = list(study["models"])
    ev = study["evaluation"]
    for stage in ("pretrain", "embed", "whitebox"):
        assert sorted(plan.loc[plan["stage"] == stage, "model"]) == sorted(models)
    assert sorted(plan.loc[plan["stage"] == "autoattack", "model"]) == sorted(ev["whitebox"]["autoattack"]["models"])
    assert sorted(plan.loc[plan["stage"] == "transfer", "model"]) == sorted(ev["transfer"]["models"])
    assert (plan["gpu_hours"] > 0).all()


def test_doubling_training_steps_doubles_pretraining_only(study):
    base = plan_study(study, PATCHES)
    longer = copy.deepcopy(study)
    longer["pretrain"]["train"]["steps"] *= 2
    # DINO's models share one `train` mapping (a YAML merge key): double each mapping once.
    for train in {id(e["train"]): e["train"] for e in longer["models"].values() if "steps" in e.get("train", {})}.values():
        train["steps"] *= 2
    plan = plan_study(longer, PATCHES)
    assert _hours(plan, "pretrain") == pytest.approx(2 * _hours(base, "pretrain"))
    for stage in ("embed", "whitebox", "autoattack", "sanity", "transfer", "mil"):
        assert _hours(plan, stage) == pytest.approx(_hours(base, stage))


def test_validation_patches_scale_the_attacks_and_train_patches_the_embedding(study):
    base = plan_study(study, PATCHES)
    more_val = plan_study(study, {**PATCHES, "val": 3 * PATCHES["val"]})
    for stage in ("whitebox", "autoattack", "sanity", "transfer", "mil"):
        assert _hours(more_val, stage) == pytest.approx(3 * _hours(base, stage))
    assert _hours(more_val, "pretrain") == pytest.approx(_hours(base, "pretrain"))
    more_train = plan_study(study, {**PATCHES, "train": 2 * PATCHES["train"]})
    want = (2 * PATCHES["train"] + PATCHES["val"]) / (PATCHES["train"] + PATCHES["val"])
    assert _hours(more_train, "embed") == pytest.approx(want * _hours(base, "embed"))


def test_attack_steps_cost_the_adversarial_methods_only(study):
    """HSAT trains on adversarial views only: a step is k input-gradient passes plus one training
    pass per view, so k -> 2k multiplies it by (2k + 1) / (k + 1); HiDisc has no attack."""
    k = study["pretrain"]["attack"]["steps"]
    assert study["pretrain"]["attack"]["only_adversarial"]
    harder = copy.deepcopy(study)
    harder["pretrain"]["attack"]["steps"] = 2 * k
    base, plan = plan_study(study, PATCHES), plan_study(harder, PATCHES)
    assert _hours(plan, "pretrain", "hsat_resnet50") == pytest.approx((2 * k + 1) / (k + 1) * _hours(base, "pretrain", "hsat_resnet50"))
    assert _hours(plan, "pretrain", "hidisc_resnet50") == pytest.approx(_hours(base, "pretrain", "hidisc_resnet50"))


def test_batch_size_attack_configurations_and_models(study):
    base = plan_study(study, PATCHES)
    bigger = copy.deepcopy(study)
    bigger["pretrain"]["data"]["patients_per_batch"] *= 2
    assert _hours(plan_study(bigger, PATCHES), "pretrain", "hsat_resnet50") == pytest.approx(
        2 * _hours(base, "pretrain", "hsat_resnet50"))
    wider = copy.deepcopy(study)
    wider["evaluation"]["whitebox"]["eps"] = [*study["evaluation"]["whitebox"]["eps"], 16]
    ratio = len(wider["evaluation"]["whitebox"]["eps"]) / len(study["evaluation"]["whitebox"]["eps"])
    assert _hours(plan_study(wider, PATCHES), "whitebox") == pytest.approx(ratio * _hours(base, "whitebox"))
    one_more = copy.deepcopy(study)
    one_more["evaluation"]["whitebox"]["autoattack"]["models"].append("hsat_wresnet50")
    plan = plan_study(one_more, PATCHES)
    assert set(plan.loc[plan["stage"] == "autoattack", "model"]) == {*study["evaluation"]["whitebox"]["autoattack"]["models"], "hsat_wresnet50"}


def test_image_size_and_precision(study):
    base = plan_study(study, PATCHES)
    half = copy.deepcopy(study)
    half["pretrain"]["data"]["image_size"] //= 2
    # HLSS and DINO set their own size: only the models that inherit the shared one shrink.
    assert _hours(plan_study(half, PATCHES), "pretrain", "hsat_resnet50") == pytest.approx(
        _hours(base, "pretrain", "hsat_resnet50") / 4, rel=0.02)
    full = copy.deepcopy(study)
    full["pretrain"]["precision"] = "fp32"
    assert study["pretrain"]["precision"] == "bf16"
    assert _hours(plan_study(full, PATCHES), "pretrain") == pytest.approx(_hours(base, "pretrain") / FP32_FACTOR)


def test_measured_throughput_replaces_the_default(study):
    """A bench entry at 448 px in fp32 doing R patch-steps/s is 4 R / FP32_FACTOR at 224 px in bf16;
    twice the default rate halves that backbone's hours and leaves the others alone."""
    rate = 2 * DEFAULT_THROUGHPUT["resnet50"] * FP32_FACTOR / 4
    report = {"entries": [{"backbone": "resnet50", "image_size": 448, "effective_precision": "fp32",
                           "eval_patches_per_s": rate}]}
    measured = throughputs_from_bench(report)
    assert measured == {"resnet50": pytest.approx(2 * DEFAULT_THROUGHPUT["resnet50"])}
    base = plan_study(study, PATCHES)
    plan = plan_study(study, PATCHES, {**DEFAULT_THROUGHPUT, **measured})
    assert _hours(plan, "whitebox", "hsat_resnet50") == pytest.approx(_hours(base, "whitebox", "hsat_resnet50") / 2)
    assert _hours(plan, "whitebox", "hsat_wresnet50") == pytest.approx(_hours(base, "whitebox", "hsat_wresnet50"))
    with pytest.raises(HSATError, match="no throughput for backbone 'wide_resnet50_2'.*hsat bench"):
        plan_study(study, PATCHES, measured)
    with pytest.raises(HSATError, match="entries"):
        throughputs_from_bench({"machine": {}})


def test_cli_plan_prints_stages_and_total_and_writes_csv(tmp_path, capsys):
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({"entries": [{"backbone": "resnet50", "image_size": 224, "effective_precision": "bf16",
                                              "eval_patches_per_s": 1000.0}]}), encoding="utf-8")
    out = tmp_path / "plan.csv"
    code = main(["plan", "--configfile", str(REPO / "config" / "opensrh.yaml"), "--base", str(REPO / "config" / "config.yaml"),
                 "--bench", str(bench), "--patches", "4000", "1000", "--csv", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert text.splitlines()[0].split() == ["stage", "jobs", "GPU-hours"]
    assert "total" in text and "4,000 train, 1,000 validation (given)" in text and str(bench) in text
    plan = pd.read_csv(out)
    total = float(next(line for line in text.splitlines() if line.startswith("total")).split()[-1])
    assert total == pytest.approx(plan["gpu_hours"].sum(), abs=0.05)
    assert main(["plan", "--configfile", str(REPO / "config" / "opensrh.yaml"), "--base", str(REPO / "config" / "config.yaml"),
                 "--set", "pretrain.model.backbone=convnext_tiny", "--patches", "10", "10"]) == 2
    assert "no throughput for backbone 'convnext_tiny'" in capsys.readouterr().err


def test_max_val_patches_caps_the_attacked_subset_but_not_the_slide_attack(study):
    capped = copy.deepcopy(study)
    capped["evaluation"]["max_val_patches"] = PATCHES["val"] // 2
    base = plan_study(capped, PATCHES)
    more = plan_study(capped, {**PATCHES, "val": 2 * PATCHES["val"]})
    for stage in ("whitebox", "autoattack", "sanity", "transfer"):
        assert _hours(more, stage) == pytest.approx(_hours(base, stage))
    assert _hours(more, "mil") == pytest.approx(2 * _hours(base, "mil"))
    assert _hours(base, "whitebox") == pytest.approx(_hours(plan_study(study, PATCHES), "whitebox") / 2)
