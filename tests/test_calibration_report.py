"""The cohort calibration verdicts are computed from whitebox rows and can fail."""

from __future__ import annotations

import pandas as pd
import pytest

from hsat.errors import HSATError
from hsat.report.calibration import TARGETS, adoptable, format_markdown, per_model, verdicts


def rows(method: str, seed: int, classifier: str, clean: float, worst8: float) -> list[dict]:
    base = {"model": f"{method}_s{seed}", "method": method, "group": "scratch", "seed": seed, "steps": 5,
            "classifier": classifier, "level": "patch", "mca": 0.0, "top2": 0.0, "top3": 0.0, "map": 0.0}
    out = [
        {**base, "attack": "none", "eps": 0.0, "objective": "none", "acc": clean},
        {**base, "attack": "pgd", "eps": 8.0, "objective": "feature", "acc": worst8 + 20},
        {**base, "attack": "pgd", "eps": 8.0, "objective": "linear_ce", "acc": worst8 + 5},
        {**base, "attack": "worst_case", "eps": 4.0, "objective": "all", "acc": worst8 + 10},
        {**base, "attack": "worst_case", "eps": 8.0, "objective": "all", "acc": worst8},
    ]
    # A slide-level row that must not be read as the patch-level one.
    out.append({**out[-1], "level": "slide", "acc": 99.0})
    return out


def cohort(hidisc_worst: list[float], at_worst: list[float]) -> pd.DataFrame:
    r: list[dict] = []
    for seed, w in enumerate(hidisc_worst):
        r += rows("hidisc", seed, "knn", 85.0, w)
    for seed, w in enumerate(at_worst):
        r += rows("supervised_at", seed, "head", 80.0, w) + rows("supervised_at", seed, "knn", 82.0, w - 1)
    return pd.DataFrame(r)


def test_every_target_met_on_three_seeds_is_adoptable():
    v = verdicts(cohort([10.0, 12.0, 14.0], [50.0, 52.0, 54.0]))
    assert list(v["verdict"]) == ["met"] * len(TARGETS)
    assert adoptable(v)
    hidisc_worst = v[v["target"] == "hidisc knn worst case 8/255 <= 15"].iloc[0]
    assert hidisc_worst["mean"] == pytest.approx(12.0) and hidisc_worst["worst_seed"] == 14.0


def test_a_missed_target_or_too_few_seeds_blocks_adoption():
    v = verdicts(cohort([10.0, 14.0, 22.0], [50.0, 52.0, 54.0]))  # HiDisc's mean 15.3 > 15
    assert v.set_index("target").loc["hidisc knn worst case 8/255 <= 15", "verdict"] == "not met"
    assert not adoptable(v)
    one_seed = verdicts(cohort([10.0], [50.0]))
    assert all(s.startswith("met (provisional: 1 seed") for s in one_seed["verdict"])
    assert not adoptable(one_seed)
    # The robust reference is judged by its own head; kNN on its features is reported, not judged.
    v = verdicts(cohort([10.0, 12.0, 14.0], [45.5, 45.5, 45.5]))  # head 45.5 met, kNN 44.5 not a target
    assert adoptable(v) and not v["target"].str.startswith("supervised_at knn").any()
    v = verdicts(cohort([10.0, 12.0, 14.0], [44.0, 46.0, 44.5]))  # head's mean 44.8 < 45
    assert v.set_index("target").loc["supervised_at head worst case 8/255 >= 45", "verdict"] == "not met"
    assert not adoptable(v)
    assert "| supervised_at | knn | 3 |" in format_markdown(cohort([10.0, 12.0, 14.0], [45.5, 45.5, 45.5]))


def test_patch_rows_only_and_missing_models_say_so():
    pm = per_model(cohort([10.0], [50.0]))
    assert set(pm["worst_8"]) <= {10.0, 50.0, 49.0}
    v = verdicts(cohort([10.0, 11.0, 12.0], []))
    assert (v[v["target"].str.startswith("supervised_at")]["verdict"] == "no rows").all()
    assert not adoptable(v)
    with pytest.raises(HSATError, match="acc"):
        per_model(cohort([10.0], [50.0]).drop(columns=["acc"]))
    assert "Adoptable (every target met on >= 3 seeds): **no**" in format_markdown(cohort([10.0], [50.0]))


def test_cli_writes_the_markdown_and_refuses_a_missing_file(tmp_path):
    from hsat.cli import main

    wb = tmp_path / "wb.csv"
    cohort([10.0, 12.0, 14.0], [50.0, 52.0, 54.0]).to_csv(wb, index=False)
    out = tmp_path / "calibration.md"
    assert main(["report", "calibration", "--out", str(out), str(wb)]) == 0
    assert "**yes**" in out.read_text()
    assert main(["report", "calibration", str(tmp_path / "missing.csv")]) == 2
