"""The patient-level hierarchical bootstrap: known truth in simulated studies, per-example files, claims."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hsat.errors import HSATError
from hsat.evaluate.examples import EXAMPLE_COLUMNS, example_rows
from hsat.evaluate.sweep import AttackResults, AttackSpec
from hsat.evaluate.worst_case import worst_case_rows
from hsat.report.claims import HOLDS, claims, welch_gap
from hsat.report.resampling import PerExample, hierarchical_bootstrap, patient_weights

CLASSES, PATIENTS_PER_CLASS, PATCHES = 7, 5, 6
"""The default study's attacked subset: 35 validation patients, 210 patches."""


def _cohort():
    patients = np.repeat(np.arange(CLASSES * PATIENTS_PER_CLASS), PATCHES)
    return patients, patients // PATIENTS_PER_CLASS


def _arm(correct, patients, strata, n_examples=None):
    """A claims arm of models' per-example correctness (models, N)."""
    acc = 100.0 * correct.mean(1)
    arm = {"method": "m", "label": "m", "mean": float(acc.mean()), "sd": float(acc.std(ddof=1)), "n": len(acc),
           "seeds": [], "n_examples": n_examples}
    if patients is not None:
        arm["per_example"] = PerExample(correct.astype(float), tuple(range(correct.shape[1])),
                                        tuple(map(str, patients)), tuple(map(str, strata)))
    return arm


def _studies(effect, studies, rng_seed, tau=1.5, seeds=3):
    """Signs of welch_gap (patient bootstrap; binomial term) in simulated studies of two methods.

    Each study draws its 35 validation patients afresh: a patient's difficulty (logit sd 1.5), and
    how much better method a does than b on it, `tau` (logit sd; symmetric, so neither is better
    on the population); each patch adds its own difficulty (sd 0.5), each model (3 seeds per
    method) its own skill (sd 0.3), and a model gets a patch right with the resulting probability.
    Method a's logit is raised by `effect`. Truth: a - b = 0 on the population when effect = 0."""
    rng = np.random.default_rng(rng_seed)
    patients, strata = _cohort()
    boot, binomial = [], []
    for _ in range(studies):
        base = rng.normal(0, 1.5, patients.max() + 1)[patients] + rng.normal(0, 0.5, len(patients))
        delta = rng.normal(0, tau, patients.max() + 1)[patients]
        arms = []
        for sign in (1, -1):
            logit = base + sign * delta / 2 + (effect if sign == 1 else 0.0) + rng.normal(0, 0.3, (seeds, 1))
            arms.append(rng.random((seeds, len(patients))) < 1 / (1 + np.exp(-logit)))
        boot.append(welch_gap(_arm(arms[0], patients, strata), _arm(arms[1], patients, strata))["sign"])
        binomial.append(welch_gap(_arm(arms[0], None, None, len(patients)), _arm(arms[1], None, None, len(patients)))["sign"])
    return np.array(boot), np.array(binomial)


def test_null_difference_holds_in_at_most_five_percent_with_patient_clustering():
    """No difference on the population, but each patient favours one method: a difference is declared
    (either way) in at most 5 % of 300 studies plus a binomial tolerance (2.33 sd: 7.9 %)."""
    boot, _ = _studies(effect=0.0, studies=300, rng_seed=0)
    tolerance = 0.05 + 2.33 * np.sqrt(0.05 * 0.95 / 300)
    assert (boot != 0).mean() <= tolerance and (boot == 1).mean() <= tolerance / 2 + 0.01


def test_null_difference_without_patient_effects():
    """Both methods alike on every patient: the bootstrap declares a difference in at most ~5 %."""
    boot, _ = _studies(effect=0.0, studies=200, rng_seed=1, tau=0.0)
    assert (boot != 0).mean() <= 0.05 + 2.33 * np.sqrt(0.05 * 0.95 / 200)


def test_patient_clustering_widens_the_sampling_term_beyond_the_binomial():
    """Patients that strongly favour one method or the other (logit sd 4): the difference's variance
    over patient draws exceeds the binomial terms of both arms, which treat 210 patches as independent."""
    rng = np.random.default_rng(3)
    patients, strata = _cohort()
    delta = rng.normal(0, 4.0, patients.max() + 1)[patients]
    a = rng.random((3, len(patients))) < 1 / (1 + np.exp(-delta / 2))
    b = rng.random((3, len(patients))) < 1 / (1 + np.exp(delta / 2))
    boot = hierarchical_bootstrap(a, b, patients, strata)
    binomial = sum(100.0 ** 2 * p * (1 - p) / len(patients) for p in (a.mean(), b.mean()))
    assert boot["sampling_var"] > 1.5 * binomial


def test_real_difference_is_found_in_most_studies():
    """Method a better by 1.5 logits (~25 points): found, the right way, in most of 200 studies."""
    boot, _ = _studies(effect=1.5, studies=200, rng_seed=2)
    assert (boot == 1).mean() >= 0.8 and (boot == -1).sum() == 0


def test_hierarchical_bootstrap_is_deterministic_and_paired():
    patients, strata = _cohort()
    rng = np.random.default_rng(5)
    a = rng.random((3, len(patients))) < 0.6
    b = rng.random((3, len(patients))) < 0.4
    one = hierarchical_bootstrap(a, b, patients, strata)
    assert one == hierarchical_bootstrap(a, b, patients, strata)
    assert one["estimate"] == pytest.approx(100 * (a.mean() - b.mean()))
    lo, hi = one["interval"]
    assert lo < one["estimate"] < hi and one["patients"] == 35 and one["p_value"] < 0.05
    # the same models on both sides: every patient draw moves both arms alike
    assert hierarchical_bootstrap(a, a, patients, strata)["sampling_var"] == pytest.approx(0.0)
    with pytest.raises(HSATError, match="examples"):
        hierarchical_bootstrap(a, b[:, :10], patients, strata)


def test_a_class_of_one_patient_is_resampled_with_the_others():
    """One validation patient per class (a tiny cohort): stratifying by class would always draw the
    same patients and see no sampling noise, so the patients are resampled together."""
    rng = np.random.default_rng(4)
    patients = np.repeat(np.arange(7), 8)
    a, b = rng.random((1, 56)) < 0.7, rng.random((1, 56)) < 0.5
    assert hierarchical_bootstrap(a, b, patients, patients)["sampling_var"] > 1.0


def test_patient_weights_keep_each_stratum_size():
    groups = [np.array([0, 1, 2]), np.array([3, 4])]
    w = patient_weights(5, groups, 50, np.random.default_rng(0))
    assert w.shape == (50, 5) and (w[:, :3].sum(1) == 3).all() and (w[:, 3:].sum(1) == 2).all()
    assert len({tuple(row) for row in w}) > 1


# ----------------------------------------------------------------------------- per-example files


def _results(rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    n, c = 40, 4
    labels = np.arange(n) // 8 % c  # one class per patient
    specs = [AttackSpec("pgd", 4.0, 5, "feature"), AttackSpec("pgd", 8.0, 5, "feature"), AttackSpec("bim", 8.0, 5, "linear_ce"),
             AttackSpec("noise", 8.0, 0, "none")]
    clean = {"knn": rng.random((n, c)) + np.eye(c)[labels], "linear": rng.random((n, c))}
    adv = [{k: rng.random((n, c)) + 0.5 * np.eye(c)[labels] for k in clean} for _ in specs]
    return AttackResults(labels=labels, patients=[f"P{i // 8}" for i in range(n)], slides=[f"S{i // 4}" for i in range(n)],
                         paths=[f"p{i}" for i in range(n)], positions=list(range(100, 100 + n)), clean=clean, adv=adv,
                         specs=specs)


def test_example_rows_average_to_the_whitebox_accuracies():
    res = _results()
    ex = example_rows(res, {"model": "m", "method": "hidisc", "group": "g", "seed": 0})
    assert list(ex.columns) == list(EXAMPLE_COLUMNS)
    assert set(ex["attack"]) == {"none", "pgd", "worst_case"}  # BIM and the noise baseline are not kept
    for row in worst_case_rows(res):
        if row["level"] == "patch":
            sel = ex[(ex["attack"] == "worst_case") & (ex["eps"] == row["eps"]) & (ex["classifier"] == row["classifier"])]
            assert 100 * sel["correct"].mean() == pytest.approx(row["acc"]) and len(sel) == 40
    clean = ex[(ex["attack"] == "none") & (ex["classifier"] == "knn")]
    assert 100 * clean["correct"].mean() == pytest.approx(100 * (res.clean["knn"].argmax(1) == res.labels).mean())
    assert clean["example"].tolist() == list(range(100, 140)) and clean["patient"].iloc[9] == "P1"


def _claim_frames(shift):
    """whitebox rows (kNN, patch: clean and worst case at 8) and the per-example rows they come from,
    for 3 HiDisc and 3 HSAT seeds; HSAT gets `shift` more patches right per 100."""
    rng = np.random.default_rng(0)
    patients, strata = _cohort()
    wb, ex = [], []
    for method in ("hidisc", "hsat"):
        for s in range(3):
            model = f"{method}_s{s}"
            for attack, eps, objective, p in (("none", 0.0, "none", 0.8), ("worst_case", 8.0, "all", 0.3 + (shift if method == "hsat" else 0))):
                correct = (rng.random(len(patients)) < p).astype(int)
                base = dict(model=model, method=method, group="scratch", seed=s, attack=attack, eps=eps, objective=objective,
                            classifier="knn")
                wb.append(dict(base, steps=5, level="patch", acc=100 * correct.mean(), mca=0.0, top2=0.0, top3=0.0, map=0.0))
                ex.append(pd.DataFrame({**{k: [v] * len(patients) for k, v in base.items()}, "restart": 0,
                                        "example": np.arange(len(patients)), "patient": [f"P{p}" for p in patients],
                                        "slide": [f"S{p}" for p in patients], "label": strata, "correct": correct}))
    return pd.DataFrame(wb), pd.concat(ex, ignore_index=True)


@pytest.fixture(scope="module")
def two_method_study():
    from hsat.config import validate

    models = {f"{m}_s{s}": {"method": {"name": m}, "seed": s, "group": "scratch"} for m in ("hidisc", "hsat") for s in range(3)}
    return validate({"models": models, "pretrain": {"model": {"backbone": "test_resnet"}}}, "study")


def test_claims_resample_patients_when_given_the_examples(two_method_study):
    wb, ex = _claim_frames(shift=0.4)
    found = {c["id"]: c for c in claims(wb, None, None, two_method_study, examples=ex)}
    c = found["whitebox_worst_case"]
    test = c["numbers"]["tests"][0]
    assert test["bootstrap"] is not None and test["bootstrap"]["patients"] == 35
    assert "hierarchical bootstrap" in test["rule"] and "bootstrap" in c["reason"]
    assert c["verdict"] == HOLDS
    lo, hi = test["bootstrap"]["interval"]
    assert lo > 0 and test["interval"][0] > 0
    cost = found["clean_cost"]["numbers"]
    assert cost["tests"][0]["bootstrap"] is not None and cost["p_value_bootstrap"] is not None
    # without the files: the binomial term, as before
    plain = {c["id"]: c for c in claims(wb, None, None, two_method_study)}["whitebox_worst_case"]["numbers"]["tests"][0]
    assert plain["bootstrap"] is None and "binomial" in plain["rule"]


def test_claims_refuse_examples_of_another_evaluation(two_method_study):
    wb, ex = _claim_frames(shift=0.4)
    ex.loc[(ex["model"] == "hsat_s1") & (ex["attack"] == "worst_case"), "correct"] = 0
    with pytest.raises(HSATError, match="hsat_s1.*different evaluations"):
        claims(wb, None, None, two_method_study, examples=ex)


def test_cli_tables_reads_the_examples_and_replicates_lines_up_two_draws(two_method_study, tmp_path):
    import json

    from hsat.cli import main
    from hsat.io import write_yaml

    cfg = tmp_path / "study.yaml"
    write_yaml(cfg, two_method_study)
    tr = tmp_path / "tr.csv"
    tr.write_text("")
    metrics = {}
    for draw, shift in (("draw0", 0.4), ("draw1", 0.0)):
        wb, ex = _claim_frames(shift=shift)
        wb.to_csv(tmp_path / f"wb_{draw}.csv", index=False)
        parts = []
        for model, rows in ex.groupby("model"):
            parts.append(tmp_path / f"{draw}_{model}.csv")
            rows.to_csv(parts[-1], index=False)
        metrics[draw] = tmp_path / f"metrics_{draw}.json"
        assert main(["report", "tables", "--study", str(cfg), "--whitebox", str(tmp_path / f"wb_{draw}.csv"),
                     "--transfer", str(tr), "--out-dir", str(tmp_path / f"tables_{draw}"), "--metrics", str(metrics[draw]),
                     "--examples", *map(str, parts)]) == 0
    found = {c["id"]: c for c in json.loads(metrics["draw0"].read_text())["claims"]}
    assert found["whitebox_worst_case"]["numbers"]["tests"][0]["bootstrap"]["patients"] == 35
    out = tmp_path / "replicates.md"
    assert main(["report", "replicates", "--out", str(out), *(f"{d}={p}" for d, p in metrics.items())]) == 0
    text = out.read_text()
    assert "draw0 verdict" in text and "draw1 verdict" in text
    row = next(line for line in text.splitlines() if line.startswith("| whitebox_worst_case "))
    assert "holds" in row and "differs" in row  # draw1 has no gap: not "holds" there
    assert main(["report", "replicates", "--out", str(out), "draw0"]) == 2
