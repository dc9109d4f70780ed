"""The small views DVC shows (hsat report dvc): plot data with one line per Table 1 row, a
compact metrics file, and the command that writes them."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hsat.cli import main
from hsat.io import write_yaml
from hsat.report import method_label
from hsat.report.dvc import (
    ROBUST_ACCURACY_COLUMNS, TRAINING_COLUMNS, headline_numbers, robust_accuracy_points, row_labels, training_points,
)
from test_report import _sel, study, whitebox  # noqa: F401 (fixtures)


def _flat_keys(obj, prefix=""):
    """The columns `dvc metrics show` prints for a JSON object."""
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _flat_keys(v, f"{prefix}{key}.")]
    return [prefix[:-1]]


def test_robust_accuracy_points_are_table1_means_over_seeds(whitebox, study):  # noqa: F811
    points = robust_accuracy_points(whitebox, study)
    assert list(points.columns) == ROBUST_ACCURACY_COLUMNS
    # One point per level, row and eps: clean at 0, the worst case at each attacked eps, nothing else.
    assert not points.duplicated(["level", "label", "eps"]).any()
    assert set(points["eps"]) == {0, 4, 8}
    assert list(dict.fromkeys(points["level"])) == ["patch", "slide", "patient"]
    hsat = points[(points["label"] == "HSAT") & (points["level"] == "slide")].set_index("eps")
    worst = _sel(whitebox, method="hsat", attack="worst_case", eps=8, classifier="knn", level="slide")["acc"]
    clean = _sel(whitebox, method="hsat", attack="none", classifier="knn", level="slide")["acc"]
    assert hsat.loc[8, "acc"] == pytest.approx(worst.mean()) and hsat.loc[8, "std"] == pytest.approx(worst.std(ddof=1))
    assert hsat.loc[0, "acc"] == pytest.approx(clean.mean()) and hsat.loc[8, "n"] == 3
    # A one-model row has no spread to show.
    patch_only = points[points["label"] == method_label("hsat_patch")]
    assert (patch_only["n"] == 1).all() and patch_only["std"].isna().all()


def test_row_labels_name_backbone_and_group_only_where_a_method_has_several():
    df = pd.DataFrame({
        "method": ["hsat", "hsat", "hsat", "hidisc"],
        "backbone": ["resnet50", "resnet101", "resnet50", "resnet50"],
        "group": ["scratch", "scratch", "imagenet", "scratch"],
    })
    assert list(row_labels(df)) == ["HSAT (resnet50, scratch)", "HSAT (resnet101, scratch)", "HSAT (resnet50, imagenet)", "HiDisc"]


def test_headline_numbers_are_few_and_come_from_the_points(whitebox, study):  # noqa: F811
    points = robust_accuracy_points(whitebox, study)
    claims = [{"verdict": "holds"}, {"verdict": "holds"}, {"verdict": "cannot be judged"}]
    out = headline_numbers(points, study, claims, sanity_failed=1)
    patch = points[points["level"] == "patch"].set_index(["method", "eps"])["acc"]
    entry = out["scratch/test_resnet"]
    assert out["worst_case_eps"] == 8
    assert entry["hsat"]["worst_case"] == pytest.approx(patch["hsat", 8], abs=0.01)
    assert entry["hidisc"]["clean"] == pytest.approx(patch["hidisc", 0], abs=0.01)
    assert out["claims"] == {"holds": 2, "does_not_hold": 0, "cannot_be_judged": 1} and out["sanity_failed"] == 1
    # Compact: one row of a handful of columns in `dvc metrics show`, not the claims' every number.
    assert len(_flat_keys(out)) == 9
    # Without HSAT or the baseline in a group, the group has no entry (nothing to compare).
    assert list(headline_numbers(points[points["method"] != "hidisc"], study)) == ["worst_case_eps", "claims"]


def test_training_points_one_line_per_model(tmp_path, study):  # noqa: F811
    for model, losses in {"hsat_s0": [3.0, 2.5], "hidisc_s1": [4.0, 3.0], "other_study": [1.0]}.items():
        (tmp_path / model).mkdir()
        (tmp_path / model / "log.jsonl").write_text(
            "".join(json.dumps({"step": i + 1, "loss_total": v, "eps": 0.0}) + "\n" for i, v in enumerate(losses)))
    out = training_points(tmp_path, study)
    assert list(out.columns) == TRAINING_COLUMNS
    assert set(out["model"]) == {"hsat_s0", "hidisc_s1"}  # runs of another study are left out
    assert set(out["label"]) == {"HSAT", "HiDisc"} and list(out[out["model"] == "hsat_s0"]["loss"]) == [3.0, 2.5]


def test_cli_writes_the_views_and_names_a_missing_metrics_file(whitebox, study, tmp_path):  # noqa: F811
    cfg, wb = tmp_path / "study.yaml", tmp_path / "wb.csv"
    write_yaml(cfg, study)
    whitebox.to_csv(wb, index=False)
    (tmp_path / "runs").mkdir()
    args = ["report", "dvc", "--study", str(cfg), "--whitebox", str(wb), "--runs-dir", str(tmp_path / "runs"),
            "--plots-dir", str(tmp_path / "plots"), "--summary", str(tmp_path / "summary.json")]
    assert main([*args, "--metrics", str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "plots").exists() and not (tmp_path / "summary.json").exists()

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"claims": [{"verdict": "does not hold"}], "sanity_failed": 0}))
    assert main([*args, "--metrics", str(metrics)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["claims"]["does_not_hold"] == 1 and "scratch/test_resnet" in summary
    assert len(pd.read_csv(tmp_path / "plots" / "robust_accuracy.csv")) == len(robust_accuracy_points(whitebox, study))
    assert list(pd.read_csv(tmp_path / "plots" / "training_loss.csv").columns) == TRAINING_COLUMNS
