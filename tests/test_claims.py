"""Claims with verdicts from small hand-made result frames whose numbers the tests choose."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hsat.config import validate
from hsat.report.claims import FAILS, HOLDS, ROBUSTNESS_CLAIMS, UNJUDGED, claims, is_vit, welch_gap, write_claims

SEEDED = {"hidisc": ["hidisc_s0", "hidisc_s1", "hidisc_s2"], "hsat": ["hsat_s0", "hsat_s1", "hsat_s2"]}
SINGLE = {"hsat_patch": "hsat_patch", "hsat_slide": "hsat_slide", "lmax_p": "hsat_lmax_patch", "lmax_ps": "hsat_lmax_patch_slide"}
CUSTOM = {"adversarial": True, "min_levels": ["patch"], "max_levels": ["patch"]}
REFS = {"sup": {"method": {"name": "supervised", **CUSTOM, "adversarial": False}, "seed": 0},
        "sup_at": {"method": {"name": "supervised_at", **CUSTOM}, "seed": 0}}
GROUP = "scratch"
CFG = {"pretrain": {"model": {"backbone": "test_resnet"}}, "evaluation": {"max_val_patches": None}}
"""The studies' settings. `max_val_patches: null` leaves N unknown, so the verdicts judge the seed
noise alone, of the numbers each test chooses; the tests of the sampling term set N."""
KEY = (GROUP, "test_resnet")


def _models(extra=None):
    models = {m: {"method": {"name": method}, "seed": int(m[-1])} for method, names in SEEDED.items() for m in names}
    models.update({m: {"method": {"name": method}, "seed": 7} for m, method in SINGLE.items()})
    models.update(extra or {})
    return {name: {**spec, "group": GROUP} for name, spec in models.items()}


@pytest.fixture(scope="module")
def study():
    return validate({"models": _models(), **CFG}, "study")


@pytest.fixture(scope="module")
def study_refs():
    return validate({"models": _models(REFS), **CFG}, "study")


# Per-model patch-level kNN accuracy: clean, worst case at eps 8, PGD (feature objective) at eps 8.
BASE = {
    "hidisc_s0": (83.0, 10.0, 12.0), "hidisc_s1": (84.0, 11.0, 13.0), "hidisc_s2": (85.0, 12.0, 14.0),
    "hsat_s0": (66.0, 40.0, 45.0), "hsat_s1": (67.0, 41.0, 46.0), "hsat_s2": (68.0, 42.0, 47.0),
    "hsat_patch": (58.0, 20.0, 25.0), "hsat_slide": (62.5, 30.0, 35.0),
    "lmax_p": (65.0, 25.0, 30.0), "lmax_ps": (65.0, 33.0, 38.0),
}
METHOD = {**{m: method for method, names in SEEDED.items() for m in names}, **SINGLE, "sup": "supervised", "sup_at": "supervised_at"}


def _seed(model):
    """The seed in a model's name (`_s<digit>`), else 7."""
    found = re.search(r"_s(\d)", model)
    return int(found.group(1)) if found else 7


def whitebox_frame(values=BASE, group=GROUP, methods=None):
    """Rows for `values` (model -> (clean, worst, pgd)), plus decoys the claims must ignore:
    the linear classifier and eps 4 with the order reversed, and the slide level."""
    methods = {**METHOD, **(methods or {})}
    rows = []
    for model, (clean, worst, pgd) in values.items():
        base = dict(model=model, method=methods[model], group=group, seed=_seed(model), steps=10)
        for classifier, flip in (("knn", 1), ("linear", -1)):
            for level in ("patch", "slide"):
                shift = 0.0 if (classifier, level) == ("knn", "patch") else 1.0
                for attack, eps, objective, acc in (
                    ("none", 0, "none", clean), ("worst_case", 8, "all", worst), ("pgd", 8, "feature", pgd),
                    ("worst_case", 4, "all", 100 - worst), ("pgd", 4, "feature", 100 - pgd),
                ):
                    value = acc if flip == 1 and shift == 0 else 100 - acc
                    rows.append(dict(base, attack=attack, eps=eps, objective=objective, classifier=classifier, level=level,
                                     acc=value, mca=value - 1, top2=value, top3=value, map=value))
    return pd.DataFrame(rows)


def transfer_frame(drops):
    """drops: (surrogate, target) -> acc_drop at patch level for PGD eps 8 (plus an eps-4 decoy)."""
    rows = []
    for (s, t), drop in drops.items():
        for eps, d in ((8, drop), (4, 99.0)):
            rows.append(dict(surrogate=s, target=t, attack="pgd", eps=eps, steps=10, objective="feature", classifier="knn",
                             level="patch", acc=50.0, mca=49.0, clean_acc=60.0, clean_mca=59.0, acc_drop=d, mca_drop=d))
    return pd.DataFrame(rows)


def same_method_drops(hidisc, hsat):
    """Every ordered pair of seeds of each method gets the next drop of its list."""
    out = {}
    for method, values in (("hidisc", hidisc), ("hsat", hsat)):
        names = SEEDED[method]
        pairs = [(s, t) for s in names for t in names if s != t]
        out.update(dict(zip(pairs, values)))
    return out


def sanity_frame(failed=0):
    rows = [dict(model="hsat_s0", check="eps", param="eps", value=v, acc=60 - v, passed=True, attack="pgd", eps=8,
                 steps=5, objective="feature", classifier="knn", criterion="acc non-increasing in eps") for v in (4, 8, 16, 32)]
    for i in range(failed):
        rows[i]["passed"] = False
    return pd.DataFrame(rows)


def by_id(found, group=KEY):
    out = {c["id"]: c for c in found if (c["group"], c["backbone"]) == group}
    out.update({c["id"]: c for c in found if c["group"] is None})
    return out


def run(values=BASE, transfer=None, sanity=None, cfg=None, study=None):
    return by_id(claims(whitebox_frame(values), transfer, sanity, cfg or study))


def with_(values=BASE, **changes):
    """BASE with some models' (clean, worst, pgd) replaced; None drops the model."""
    out = {**values, **changes}
    return {m: v for m, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- white-box robustness


def test_whitebox_holds_with_numbers_seeds_and_json(study):
    found = claims(whitebox_frame(), None, None, study)
    c = by_id(found)["whitebox_worst_case"]
    assert c["verdict"] == HOLDS and "exceeds the noise" in c["reason"]
    n = c["numbers"]
    assert n["means"] == {"hsat": pytest.approx(41.0), "hidisc": pytest.approx(11.0)}
    assert n["sds"]["hsat"] == pytest.approx(1.0) and n["ns"] == {"hsat": 3, "hidisc": 3}
    assert n["seeds"] == {"hsat": [0, 1, 2], "hidisc": [0, 1, 2]}
    assert n["models"]["hsat"] == SEEDED["hsat"]
    assert n["difference"] == pytest.approx(30.0)
    # Welch with sd 1 on both sides, n = 3: se sqrt(2/3), df (2/3)^2 / (2 (1/3)^2 / 2) = 4 (seeds only: N unknown)
    se = math.sqrt(2 / 3)
    assert n["se"] == pytest.approx(se) and n["df"] == pytest.approx(4.0)
    assert n["threshold"] == pytest.approx(stats.t.ppf(0.975, 4) * se)
    assert n["interval"] == [pytest.approx(30.0 - n["threshold"]), pytest.approx(30.0 + n["threshold"])]
    assert n["t"] == pytest.approx(30.0 / se) and n["p_value"] == pytest.approx(2 * stats.t.sf(30.0 / se, 4))
    assert n["tests"][0]["from"] == "HiDisc" and "seeds only" in n["tests"][0]["rule"]
    assert (n["eps"], n["classifier"], n["level"]) == (8.0, "knn", "patch")
    assert "41.0 ± 1.0 (n=3)" in c["measured"] and (c["group"], c["backbone"]) == KEY
    pgd = by_id(found)["whitebox_pgd"]
    assert pgd["verdict"] == HOLDS and pgd["numbers"]["means"]["hsat"] == pytest.approx(46.0)
    assert pgd["numbers"]["objective"] == "feature"
    json.dumps(found, allow_nan=False)


def test_whitebox_does_not_hold_when_hsat_lower_beyond_noise(study):
    values = with_(**{m: (70.0, 5.0 + i, 5.0 + i) for i, m in enumerate(SEEDED["hsat"])})
    c = run(values, study=study)["whitebox_worst_case"]
    assert c["verdict"] == FAILS and "other way" in c["reason"]
    assert c["numbers"]["difference"] == pytest.approx(-5.0)


def test_whitebox_gain_beyond_noise_but_below_the_margin_does_not_hold(study):
    """Higher beyond the seed noise is not "far more robust": 5 points with sd 1 fails the 15-point margin."""
    values = with_(**{m: (70.0, 15.0 + i, 16.0 + i) for i, m in enumerate(SEEDED["hsat"])})
    found = run(values, study=study)
    for cid in ("whitebox_worst_case", "whitebox_pgd"):
        c = found[cid]
        assert c["verdict"] == FAILS and "less than the 15 points" in c["reason"], c
        assert c["numbers"]["difference"] > c["numbers"]["threshold"]  # beyond the noise, below the margin
        assert "at least 15 points" in c["rule"]


def test_whitebox_inside_seed_spread_cannot_be_judged(study):
    # Means 15 vs 11, sd 10: 2 SE = 2 sqrt(100/3 + 1/3) = 11.6 > 4.
    values = with_(**{m: (70.0, w, w) for m, w in zip(SEEDED["hsat"], (5.0, 15.0, 25.0))})
    c = run(values, study=study)["whitebox_worst_case"]
    assert c["verdict"] == UNJUDGED and "inside the seed spread" in c["reason"]
    assert c["numbers"]["difference"] == pytest.approx(4.0)


def test_whitebox_fewer_than_three_seeds_cannot_be_judged(study):
    c = run(with_(hsat_s2=None), study=study)["whitebox_worst_case"]
    assert c["verdict"] == UNJUDGED and "fewer than 3 seeds" in c["reason"]
    assert c["numbers"]["seeds"]["hsat"] == [0, 1] and c["numbers"]["ns"]["hsat"] == 2
    # One HiDisc seed, a gap of 30 against an HSAT sd of 1: still unjudged (no spread rule for the main claim).
    c = run(with_(hidisc_s1=None, hidisc_s2=None), study=study)["whitebox_worst_case"]
    assert c["verdict"] == UNJUDGED and "fewer than 3 seeds (HSAT: 3, HiDisc: 1)" == c["reason"]


def test_whitebox_largest_eps_when_8_is_absent(study):
    wb = whitebox_frame()
    c = by_id(claims(wb[wb["eps"] != 8], None, None, study))["whitebox_worst_case"]
    assert c["numbers"]["eps"] == 4.0
    assert c["verdict"] == FAILS  # the eps-4 rows have the order reversed


def test_whitebox_without_worst_case_rows(study):
    wb = whitebox_frame()
    found = by_id(claims(wb[wb["attack"] != "worst_case"], None, None, study))
    assert found["whitebox_worst_case"]["verdict"] == UNJUDGED
    assert found["whitebox_worst_case"]["reason"] == "no worst_case rows"
    assert found["whitebox_pgd"]["verdict"] == HOLDS


def test_empty_whitebox_cannot_be_judged(study):
    found = claims(pd.DataFrame(), None, None, study)
    assert {c["verdict"] for c in found} == {UNJUDGED}
    assert by_id(found, (None, None))["whitebox_worst_case"]["reason"] == "no worst_case rows"


# ----------------------------------------------------------------------------- the statistics, with known truth


def _sim_arm(acc, n_examples=None):
    """An arm of `welch_gap` from per-seed accuracies (%)."""
    return {"method": "m", "label": "m", "mean": float(np.mean(acc)), "sd": float(np.std(acc, ddof=1)), "n": len(acc),
            "seeds": [], "n_examples": n_examples}


def _simulated_signs(shift, studies=2000, seeds=3, n_examples=210, rng_seed=0):
    """welch_gap's sign in `studies` simulated studies of two methods, with and without N.

    Each study draws N validation patches, shared by every model, from a population in which a
    method gets a patch right with a probability of its own, most near 0 or 1 (Beta(0.2, 0.3), mean
    40 %; the methods get different patches right); method a's probabilities are raised so its
    population accuracy is `shift` points higher. Each of `seeds` models per method then gets each
    patch right with that probability. Truth: a - b = `shift` on the population."""
    rng = np.random.default_rng(rng_seed)
    with_n, seeds_only = [], []
    for _ in range(studies):
        p_a = rng.beta(0.2, 0.3, n_examples)
        p_b = rng.beta(0.2, 0.3, n_examples)
        p_a = p_a + (1 - p_a) * shift / 60.0  # mean 40 + shift points
        acc = {m: 100.0 * (rng.random((seeds, n_examples)) < p).mean(1) for m, p in (("a", p_a), ("b", p_b))}
        with_n.append(welch_gap(_sim_arm(acc["a"], n_examples), _sim_arm(acc["b"], n_examples))["sign"])
        seeds_only.append(welch_gap(_sim_arm(acc["a"]), _sim_arm(acc["b"]))["sign"])
    return np.array(with_n), np.array(seeds_only)


def test_null_difference_holds_in_at_most_five_percent_of_studies():
    """Same population accuracy: "a > b" holds (sign +1) in at most 5 % of 2000 simulated studies and
    a difference is declared either way in at most ~5 % (<= 7 %). Judged on the seeds alone, the
    shared sample of patches makes one method look better far more often: why N enters."""
    with_n, seeds_only = _simulated_signs(shift=0.0)
    assert (with_n == 1).mean() <= 0.05
    assert (with_n != 0).mean() <= 0.07
    assert (seeds_only != 0).mean() > 0.2


def test_null_difference_with_seed_noise_alone():
    """Welch over 3 seeds a side, normal seed noise, no sampling term: a difference is declared in
    at most ~5 % of 2000 studies (the old 2-SE rule declared one in about 11 %)."""
    rng = np.random.default_rng(1)
    signs, two_se = [], []
    for _ in range(2000):
        a, b = rng.normal(40.0, 2.0, 3), rng.normal(40.0, 2.0, 3)
        d = welch_gap(_sim_arm(a), _sim_arm(b))
        signs.append(d["sign"])
        two_se.append(abs(d["gap"]) > 2 * d["se"])
    assert (np.array(signs) != 0).mean() <= 0.07 and (np.array(signs) == 1).mean() <= 0.05
    assert np.mean(two_se) > 0.07


def test_real_difference_is_found_in_most_studies():
    """A difference of a few sds is found, the right way, in most simulated studies."""
    with_n, _ = _simulated_signs(shift=15.0, studies=500, rng_seed=2)  # the difference's sd is ~4.8 points
    assert (with_n == 1).mean() >= 0.8 and (with_n == -1).sum() == 0
    rng = np.random.default_rng(3)
    signs = [welch_gap(_sim_arm(rng.normal(48.0, 2.0, 3)), _sim_arm(rng.normal(40.0, 2.0, 3)))["sign"] for _ in range(500)]
    assert np.mean(np.array(signs) == 1) >= 0.8  # 4 seed sds


def test_sampling_term_widens_the_interval_with_n(study):
    """With N = evaluation.max_val_patches (210 by default) each side's variance gains 100^2 p(1-p)/N,
    known, so the df still counts the seeds only; the claim says which."""
    cfg = validate({"models": _models(), "pretrain": {"model": {"backbone": "test_resnet"}}}, "study")
    assert cfg["evaluation"]["max_val_patches"] == 210
    c = by_id(claims(whitebox_frame(), None, None, cfg))["whitebox_worst_case"]
    n = c["numbers"]
    seed_var, known = 2 / 3, 100 ** 2 * (0.41 * 0.59 + 0.11 * 0.89) / 210
    assert n["se"] == pytest.approx(math.sqrt(seed_var + known))
    assert n["df"] == pytest.approx((seed_var + known) ** 2 / (2 * (1 / 3) ** 2 / 2))
    assert n["threshold"] == pytest.approx(stats.t.ppf(0.975, n["df"]) * n["se"])
    assert n["n_examples"] == 210 and "N = 210 validation examples" in n["tests"][0]["rule"]
    assert c["verdict"] == HOLDS  # 30 points is beyond it too
    seeds_only = by_id(claims(whitebox_frame(), None, None, study))["whitebox_worst_case"]["numbers"]
    assert seeds_only["n_examples"] is None and seeds_only["threshold"] < n["threshold"]
    # a cohort with fewer validation patches than max_val_patches: the caller passes the count
    fewer = by_id(claims(whitebox_frame(), None, None, cfg, n_examples=56))["whitebox_worst_case"]["numbers"]
    assert fewer["n_examples"] == 56 and fewer["threshold"] > n["threshold"]
    # 5 points with seed sd 1: beyond the seed noise alone, inside it once 210 patches' sampling counts
    values = with_(**{m: (70.0, 15.0 + i, 16.0 + i) for i, m in enumerate(SEEDED["hsat"])})
    assert by_id(claims(whitebox_frame(values), None, None, cfg))["whitebox_worst_case"]["verdict"] == UNJUDGED
    assert by_id(claims(whitebox_frame(values), None, None, study))["whitebox_worst_case"]["verdict"] == FAILS  # the margin


# ----------------------------------------------------------------------------- clean cost


@pytest.mark.parametrize(
    "hsat_clean, verdict, reason",
    [
        ((66.0, 67.0, 68.0), HOLDS, "contains 17"),        # drop 17
        ((78.0, 79.0, 80.0), FAILS, "smaller than 17"),    # drop 5: does not reproduce a 17-point cost
        ((50.0, 51.0, 52.0), FAILS, "exceeds 17"),         # drop 33
    ],
)
def test_clean_cost_rule(study, hsat_clean, verdict, reason):
    values = with_(**{m: (clean, 41.0, 46.0) for m, clean in zip(SEEDED["hsat"], hsat_clean)})
    c = run(values, study=study)["clean_cost"]
    assert c["verdict"] == verdict and reason in c["reason"]
    assert c["numbers"]["drop"] == pytest.approx(84.0 - sum(hsat_clean) / 3)
    assert c["numbers"]["paper_drop"] == 17.0 and "17" in c["rule"] and "83.1" in c["paper"]
    lo, hi = c["numbers"]["interval"]
    assert (lo <= 17 <= hi) == (verdict == HOLDS) and f"interval {lo:.1f} to {hi:.1f}" in c["measured"]
    assert c["claim"] == "adversarial training costs about 17 points of clean accuracy"
    assert (c["numbers"]["p_value"] >= 0.05) == (verdict == HOLDS)  # the test of drop = 17


def test_clean_cost_fewer_than_three_seeds(study):
    c = run(with_(hidisc_s0=None), study=study)["clean_cost"]
    assert c["verdict"] == UNJUDGED and "fewer than 3 seeds" in c["reason"]


# ----------------------------------------------------------------------------- black-box contrast


def test_blackbox_contrast_holds_with_seed_pairs(study):
    drops = same_method_drops([28.0, 30.0, 27.0, 29.0, 26.0, 31.0], [3.0, 4.0, 3.0, 4.0, 2.0, 5.0])
    drops[("hidisc_s0", "hsat_s0")] = 1.0  # another method's surrogate: not a same-method pair
    c = run(transfer=transfer_frame(drops), study=study)["blackbox_contrast"]
    assert c["verdict"] == HOLDS
    n = c["numbers"]
    assert n["ns"] == {"hidisc": 3, "hsat": 3}  # one unit per target seed, not per ordered pair
    assert sorted(n["targets"]["hsat"]) == [0, 1, 2]
    assert n["means"]["hidisc"] == pytest.approx(28.5) and n["means"]["hsat"] == pytest.approx(3.5)
    assert sorted(map(tuple, n["seeds"]["hsat"])) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]


def test_blackbox_contrast_sd_is_over_targets():
    """The drops of the pairs that share a target are averaged first: the sd is over the three
    targets' means, not over the six pairs (hidisc pairs s0->s1 28, s0->s2 30, s1->s0 27, s1->s2 29,
    s2->s0 26, s2->s1 31: targets s0 26.5, s1 29.5, s2 29.5)."""
    drops = same_method_drops([28.0, 30.0, 27.0, 29.0, 26.0, 31.0], [3.0, 4.0, 3.0, 4.0, 2.0, 5.0])
    study = validate({"models": _models(), **CFG}, "study")
    n = run(transfer=transfer_frame(drops), study=study)["blackbox_contrast"]["numbers"]
    assert n["sds"]["hidisc"] == pytest.approx(float(np.std([26.5, 29.5, 29.5], ddof=1)))
    assert n["df"] is not None and n["p_value"] < 0.05


def test_blackbox_contrast_reversed_does_not_hold(study):
    drops = same_method_drops([3.0, 4.0, 3.0, 4.0, 2.0, 5.0], [28.0, 30.0, 27.0, 29.0, 26.0, 31.0])
    c = run(transfer=transfer_frame(drops), study=study)["blackbox_contrast"]
    assert c["verdict"] == FAILS


def test_blackbox_contrast_two_seeds_cannot_be_judged(study):
    drops = {("hidisc_s0", "hidisc_s1"): 30.0, ("hidisc_s1", "hidisc_s0"): 28.0,
             ("hsat_s0", "hsat_s1"): 3.0, ("hsat_s1", "hsat_s0"): 4.0}
    c = run(transfer=transfer_frame(drops), study=study)["blackbox_contrast"]
    assert c["verdict"] == UNJUDGED and "fewer than 3 target seeds (HiDisc: 2, HSAT: 2)" in c["reason"]
    assert c["numbers"]["ns"] == {"hidisc": 2, "hsat": 2}


def test_blackbox_without_transfer_rows(study):
    c = run(study=study)["blackbox_contrast"]
    assert c["verdict"] == UNJUDGED and "no rows" in c["reason"]


def test_groups_are_judged_apart(study):
    """Models of the same method in another group are another comparison, transfer pairs included."""
    other = {f"{m}_adv": v for m, v in BASE.items() if m in SEEDED["hsat"]}
    cfg = validate({"models": {**_models(), **{m: {"method": {"name": "hsat"}, "seed": int(m[6]), "group": "adv"} for m in other}},
                    **CFG}, "study")
    adv_rows = whitebox_frame({m: (70.0, 1.0, 1.0) for m in other}, group="adv", methods={m: "hsat" for m in other})
    wb = pd.concat([whitebox_frame(), adv_rows])
    drops = same_method_drops([28.0, 30.0, 27.0, 29.0, 26.0, 31.0], [3.0, 4.0, 3.0, 4.0, 2.0, 5.0])
    drops.update({("hsat_s0_adv", "hsat_s1"): 90.0, ("hsat_s1", "hsat_s0_adv"): 90.0})  # across groups
    found = claims(wb, transfer_frame(drops), None, cfg)
    main, adv = by_id(found), by_id(found, ("adv", "test_resnet"))
    assert main["whitebox_worst_case"]["numbers"]["models"]["hsat"] == SEEDED["hsat"]
    assert main["whitebox_worst_case"]["verdict"] == HOLDS
    assert main["blackbox_contrast"]["numbers"]["ns"]["hsat"] == 3  # target seeds
    assert main["blackbox_contrast"]["numbers"]["means"]["hsat"] == pytest.approx(3.5)
    assert adv["whitebox_worst_case"]["numbers"]["ns"] == {"hsat": 3, "hidisc": 0}
    assert adv["whitebox_worst_case"]["numbers"]["seeds"]["hsat"] == [0, 1, 2]
    assert adv["whitebox_worst_case"]["verdict"] == UNJUDGED and "no rows for HiDisc" in adv["whitebox_worst_case"]["reason"]


# ----------------------------------------------------------------------------- ablations: n < 3


def test_level_order_single_seed_cannot_be_judged(study):
    """One seed of HSAT-Patch and HSAT-Slide: no estimate of their seed noise, so no verdict, however
    large the gaps (10 and 11 here, against HSAT's sd of 1), and the reason says how many seeds each side has."""
    c = run(study=study)["level_order_worst_case"]
    assert c["verdict"] == UNJUDGED
    assert c["reason"] == "fewer than 3 seeds (HSAT-Slide: 1, HSAT-Patch: 1); fewer than 3 seeds (HSAT: 3, HSAT-Slide: 1)"
    gaps = c["numbers"]["gaps"]
    assert [(g["from"], g["to"]) for g in gaps] == [("HSAT-Patch", "HSAT-Slide"), ("HSAT-Slide", "HSAT")]
    assert [g["gap"] for g in gaps] == [pytest.approx(10.0), pytest.approx(11.0)]
    assert all(g["threshold"] is None and g["p_value"] is None for g in gaps)
    assert c["numbers"]["seeds"]["hsat_slide"] == [7]


def _three_seed_ablations(patch_worst, slide_worst, clean=(60.0, 63.0)):
    """HSAT-Patch and HSAT-Slide with three seeds each (worst case `x + i` for seed i), judged as the paper's methods."""
    cfg = validate({"models": _models({f"slide_s{i}": {"method": {"name": "hsat_slide"}, "seed": i} for i in range(3)}
                                      | {f"patch_s{i}": {"method": {"name": "hsat_patch"}, "seed": i} for i in range(3)}),
                    **CFG}, "study")
    methods = {f"slide_s{i}": "hsat_slide" for i in range(3)} | {f"patch_s{i}": "hsat_patch" for i in range(3)}
    values = with_(hsat_patch=None, hsat_slide=None, **{f"patch_s{i}": (clean[0] + i, patch_worst + i, 25.0) for i in range(3)},
                   **{f"slide_s{i}": (clean[1] + i, slide_worst + i, 35.0) for i in range(3)})
    return by_id(claims(whitebox_frame(values, methods=methods), None, None, cfg))


def test_level_order_gap_inside_the_noise_cannot_be_judged():
    c = _three_seed_ablations(20.0, 39.5)["level_order_worst_case"]  # 41 - 40.5 = 0.5 with sd 1 on both sides
    assert c["verdict"] == UNJUDGED and "inside the seed spread" in c["reason"]


def test_level_order_inverted_beyond_the_noise_does_not_hold():
    c = _three_seed_ablations(20.0, 10.0)["level_order_worst_case"]  # slide 11 < patch 21
    assert c["verdict"] == FAILS and "other way" in c["reason"]
    # the same inversion with one seed of each ablation cannot be judged
    c = run(with_(hsat_slide=(63.0, 10.0, 35.0)), study=validate({"models": _models(), **CFG}, "study"))["level_order_worst_case"]
    assert c["verdict"] == UNJUDGED and "fewer than 3 seeds" in c["reason"]


def test_level_order_without_three_hsat_seeds_cannot_be_judged(study):
    c = run(with_(hsat_s2=None), study=study)["level_order_worst_case"]
    assert c["verdict"] == UNJUDGED
    assert "fewer than 3 seeds" in c["reason"] and "HSAT: 2" in c["reason"]


def test_level_order_clean_needs_three_seeds(study):
    # Clean: patch 58 < slide 62.5 < HSAT 67 (sd 1), one seed of each ablation: no verdict.
    c = run(study=study)["level_order_clean"]
    assert c["verdict"] == UNJUDGED and c["numbers"]["attack"] == "none"
    c = _three_seed_ablations(20.0, 30.0, clean=(55.0, 60.0))["level_order_clean"]  # 56 < 61 < 67, sd 1
    assert c["verdict"] == HOLDS and c["numbers"]["attack"] == "none"
    c = _three_seed_ablations(20.0, 30.0, clean=(55.0, 55.5))["level_order_clean"]  # 56 vs 56.5
    assert c["verdict"] == UNJUDGED


def test_lmax_ablation_same_rule(study):
    c = run(study=study)["lmax_ablation"]  # 25 < 33 < 41, sd 1, but one seed of each L_max ablation
    assert c["verdict"] == UNJUDGED and "fewer than 3 seeds" in c["reason"]
    assert c["numbers"]["means"] == {"hsat_lmax_patch": 25.0, "hsat_lmax_patch_slide": 33.0, "hsat": pytest.approx(41.0)}
    c = run(with_(lmax_ps=(65.0, 15.0, 30.0)), study=study)["lmax_ablation"]  # 15 < 25, still one seed each
    assert c["verdict"] == UNJUDGED


def test_ablation_with_three_seeds_uses_welch():
    """All ablation models with 3 seeds: Welch's t with its df for every gap."""
    c = _three_seed_ablations(20.0, 30.0)["level_order_worst_case"]
    assert c["verdict"] == HOLDS
    assert all(g["rule"].startswith("Welch t over seeds") for g in c["numbers"]["gaps"])
    assert all(g["df"] == pytest.approx(4.0) and g["p_value"] < 0.05 for g in c["numbers"]["gaps"])
    assert c["numbers"]["p_value"] == max(g["p_value"] for g in c["numbers"]["gaps"])
    assert c["numbers"]["seeds"]["hsat_slide"] == [0, 1, 2]


# ----------------------------------------------------------------------------- references


def test_references_absent_cannot_be_judged(study):
    found = run(study=study)
    for cid in ("reference_learnable", "reference_ceiling"):
        assert found[cid]["verdict"] == UNJUDGED and "no reference rows" in found[cid]["reason"]


def test_references_present(study_refs):
    values = with_(sup=(90.0, 0.0, 0.0), sup_at=(70.0, 55.0, 60.0))
    found = run(values, cfg=study_refs)
    # 55 vs 0, but one seed of each reference: no seed noise to judge the gap against
    assert found["reference_learnable"]["verdict"] == UNJUDGED
    assert found["reference_learnable"]["reason"] == "fewer than 3 seeds (Supervised AT: 1, Supervised: 1)"
    ceiling = found["reference_ceiling"]
    assert ceiling["verdict"] == UNJUDGED and "75 % of the ceiling" in ceiling["measured"]  # 41 / 55
    values = with_(sup=(90.0, 0.0, 0.0), sup_at=(70.0, 42.0, 60.0))
    assert run(values, cfg=study_refs)["reference_ceiling"]["verdict"] == UNJUDGED
    only_one = run(with_(sup_at=(70.0, 55.0, 60.0)), cfg=study_refs)["reference_learnable"]
    assert only_one["verdict"] == UNJUDGED and "no reference rows (Supervised)" == only_one["reason"]


# ----------------------------------------------------------------------------- attack quality


def test_failed_sanity_puts_caveat_on_robustness_claims(study):
    found = claims(whitebox_frame(), None, sanity_frame(failed=2), study)
    quality = found[-1]
    assert quality["id"] == "attack_quality" and quality["verdict"] == FAILS
    assert quality["numbers"]["failed"] == 2 and quality["numbers"]["checks"] == 4
    assert quality["numbers"]["failed_checks"] == ["hsat_s0 eps"]
    for c in found[:-1]:
        if c["id"] in ROBUSTNESS_CLAIMS:
            assert c["caveat"] and c["caveat"].startswith("2 of 4 sanity checks")
        else:
            assert c["caveat"] is None
    assert by_id(found)["whitebox_worst_case"]["verdict"] == HOLDS  # the verdict stands, with its caveat


def test_passed_or_missing_sanity(study):
    found = claims(whitebox_frame(), None, sanity_frame(failed=0), study)
    assert found[-1]["verdict"] == HOLDS and all(c["caveat"] is None for c in found)
    found = claims(whitebox_frame(), None, None, study)
    assert found[-1]["verdict"] == UNJUDGED and found[-1]["reason"] == "no rows in sanity.csv"
    assert all(c["caveat"] is None for c in found)


def test_attack_quality_names_the_models_whose_bf16_crafting_was_checked(study):
    sanity = sanity_frame()
    assert claims(whitebox_frame(), None, sanity, study)[-1]["numbers"]["precision_models"] == []
    precision = sanity.iloc[:1].assign(model="hidisc_s0", check="precision", param="precision", value="bf16")
    quality = claims(whitebox_frame(), None, pd.concat([sanity, precision]), study)[-1]
    assert quality["numbers"]["precision_models"] == ["hidisc_s0"] and "fp32 on hidisc_s0" in quality["measured"]


# ----------------------------------------------------------------------------- claims.md and the CLI


def test_write_claims_markdown(study, tmp_path):
    found = claims(whitebox_frame(), None, sanity_frame(failed=1), study)
    path = write_claims(found, tmp_path / "claims.md")
    text = path.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(found)  # header, rule, one row per claim
    assert "| whitebox_worst_case" in text and "holds (caveat)" in text
    assert "- seeds: HSAT: 0, 1, 2; HiDisc: 0, 1, 2" in text
    assert "- verdict: **cannot be judged**: no reference rows" in text
    assert text.count("- caveat: 1 of 4 sanity checks") == len([c for c in found if c["caveat"]])
    assert "Welch's t-test with its Welch-Satterthwaite degrees of freedom" in text
    assert "ignores their clustering by patient" in text
    assert "- statistics: HSAT - HiDisc = +30.0, 95 % interval" in text and "df = 4.0" in text


def test_cli_tables_writes_claims_and_metrics(study, tmp_path):
    from hsat.cli import main
    from hsat.io import write_yaml

    cfg = tmp_path / "study.yaml"
    write_yaml(cfg, study)
    wb, tr, sa = tmp_path / "wb.csv", tmp_path / "tr.csv", tmp_path / "sa.csv"
    whitebox_frame().to_csv(wb, index=False)
    transfer_frame(same_method_drops([28.0, 30.0, 27.0, 29.0, 26.0, 31.0], [3.0, 4.0, 3.0, 4.0, 2.0, 5.0])).to_csv(tr, index=False)
    sanity_frame(failed=1).to_csv(sa, index=False)
    metrics, md = tmp_path / "metrics.json", tmp_path / "claims.md"
    assert main(["report", "tables", "--study", str(cfg), "--whitebox", str(wb), "--transfer", str(tr), "--sanity", str(sa),
                 "--out-dir", str(tmp_path / "tables"), "--metrics", str(metrics), "--claims", str(md)]) == 0
    m = json.loads(metrics.read_text())
    assert "groups" in m and m["sanity_failed"] == 1  # the headline keys stay
    found = {c["id"]: c for c in m["claims"]}
    assert found["whitebox_worst_case"]["verdict"] == HOLDS and found["blackbox_contrast"]["verdict"] == HOLDS
    assert found["whitebox_worst_case"]["numbers"]["seeds"]["hsat"] == [0, 1, 2]
    assert "blackbox_contrast" in md.read_text()


def test_worst_cases_over_different_attacks_cannot_be_compared(study):
    """AutoAttack on HSAT only: HSAT's worst case combines one more attack than HSAT-Patch's, so
    the level ordering of worst cases cannot be judged; the HiDisc-HSAT comparison still can."""
    wb = whitebox_frame()
    extra = wb[(wb["model"].isin(SEEDED["hsat"] + SEEDED["hidisc"])) & (wb["attack"] == "pgd")].copy()
    extra["attack"], extra["objective"] = "autoattack", "linear_probe"
    found = by_id(claims(pd.concat([wb, extra], ignore_index=True), None, None, study))
    for cid, lacking in (("level_order_worst_case", "hsat_patch, hsat_slide"), ("lmax_ablation", "lmax_p, lmax_ps")):
        assert found[cid]["verdict"] == UNJUDGED and "different attacks" in found[cid]["reason"], found[cid]
        assert f"{lacking} lack autoattack/linear_probe" in found[cid]["reason"]
    assert found["whitebox_worst_case"]["verdict"] == HOLDS
    assert found["level_order_clean"]["verdict"] != UNJUDGED or "different attacks" not in found["level_order_clean"]["reason"]


# ----------------------------------------------------------------------------- HLSS

HLSS_MODELS = {
    **{f"hlss_s{i}": {"method": {"name": "hlss", "hlss": {"text_embeddings": "x.safetensors"}}, "seed": i} for i in range(3)},
    **{f"hlssna_s{i}": {"method": {"name": "hlss_noalign", "hlss": {"text_embeddings": "x.safetensors"}}, "seed": i}
       for i in range(3)},
    **{f"rhlss_s{i}": {"method": {"name": "robust_hlss", "hlss": {"text_embeddings": "x.safetensors"}}, "seed": i} for i in range(3)},
}
HLSS_VALUES = {  # clean, worst, pgd
    "hlss_s0": (88.0, 5.0, 9.0), "hlss_s1": (89.0, 6.0, 9.5), "hlss_s2": (90.0, 7.0, 10.0),
    "hlssna_s0": (86.0, 5.0, 9.0), "hlssna_s1": (89.0, 6.0, 9.0), "hlssna_s2": (91.0, 7.0, 9.0),
    "rhlss_s0": (70.0, 30.0, 40.0), "rhlss_s1": (71.0, 31.0, 41.0), "rhlss_s2": (72.0, 32.0, 42.0),
}


def test_hlss_claims_compare_with_hidisc_alignment_and_robust_hlss():
    study = validate({"models": _models(HLSS_MODELS), **CFG}, "study")
    methods = {m: spec["method"]["name"] for m, spec in HLSS_MODELS.items()}
    found = {c["id"]: c for c in claims(whitebox_frame({**BASE, **HLSS_VALUES}, methods=methods), None, None, study)}
    # HLSS 89 +- 1 vs HiDisc 84 +- 1: higher beyond 2 SE
    assert found["hlss_clean"]["verdict"] == HOLDS
    assert found["hlss_clean"]["numbers"]["difference"] == pytest.approx(5.0)
    # with vs without the alignment term: 89 vs 88.7, inside the spread
    assert found["hlss_alignment"]["verdict"] == UNJUDGED
    assert found["hlss_alignment"]["numbers"]["models"]["hlss_noalign"] == ["hlssna_s0", "hlssna_s1", "hlssna_s2"]
    assert found["robust_hlss_worst_case"]["verdict"] == HOLDS  # 31 vs 6
    assert found["robust_hlss_transfer"]["verdict"] == UNJUDGED and "no rows" in found["robust_hlss_transfer"]["reason"]
    # a study without HLSS models has no HLSS claims
    plain = {c["id"] for c in claims(whitebox_frame(), None, None, validate(
        {"models": _models(), **CFG}, "study"))}
    assert not plain & {"hlss_clean", "hlss_alignment", "robust_hlss_worst_case", "language_own_markers"}


def test_robust_hlss_transfer_claim_reads_same_method_pairs():
    """Robust HLSS's same-method transfer drop vs HLSS's, over the seed pairs of each method; a
    cross-method pair (HLSS surrogate, robust-HLSS target) is not one of them."""
    study = validate({"models": _models(HLSS_MODELS), **CFG}, "study")
    methods = {m: spec["method"]["name"] for m, spec in HLSS_MODELS.items()}
    wb = whitebox_frame({**BASE, **HLSS_VALUES}, methods=methods)

    def drops(hlss, robust):
        out = {}
        for names, values in (([f"hlss_s{i}" for i in range(3)], hlss), ([f"rhlss_s{i}" for i in range(3)], robust)):
            out.update(zip([(s, t) for s in names for t in names if s != t], values))
        out[("hlss_s0", "rhlss_s0")] = 40.0
        return out

    c = by_id(claims(wb, transfer_frame(drops([20.0, 22.0, 21.0, 23.0, 19.0, 24.0], [2.0, 3.0, 2.0, 3.0, 1.0, 4.0])), None, study))
    c = c["robust_hlss_transfer"]
    assert c["verdict"] == HOLDS and c["numbers"]["ns"] == {"hlss": 3, "robust_hlss": 3}  # target seeds
    assert c["numbers"]["means"]["robust_hlss"] == pytest.approx(2.5)
    reversed_ = by_id(claims(wb, transfer_frame(drops([2.0, 3.0, 2.0, 3.0, 1.0, 4.0], [20.0, 22.0, 21.0, 23.0, 19.0, 24.0])), None, study))
    assert reversed_["robust_hlss_transfer"]["verdict"] == FAILS


def _language_frame(clean_acc, pgd_acc):
    rows = []
    for model, method, seed in [(f"hlss_s{i}", "hlss", i) for i in range(3)] + [(f"rhlss_s{i}", "robust_hlss", i) for i in range(3)]:
        for condition, accs in (("clean", clean_acc[method]), ("pgd", pgd_acc[method])):
            for c, cls in enumerate(["a", "b", "c", "d"]):
                for mc in ["a", "b", "c", "d"]:
                    rows.append(dict(model=model, method=method, group=GROUP, seed=seed, condition=condition,
                                     eps=0.0 if condition == "clean" else 8.0, true_class=cls, marker_class=mc, marker="m",
                                     similarity=0.5 if mc == cls else 0.1, zero_shot_acc=accs[seed] if c == 0 else accs[seed] - 1, n=5))
    return pd.DataFrame(rows)


def test_language_claims_judge_chance_and_the_attack():
    lang = _language_frame({"hlss": [60, 62, 64], "robust_hlss": [50, 51, 52]}, {"hlss": [10, 11, 12], "robust_hlss": [45, 46, 47]})
    found = {c["id"]: c for c in claims(None, None, None, {"models": {}}, lang)}
    assert found["language_own_markers"]["verdict"] == HOLDS  # ~61 % vs 25 % chance
    assert found["language_own_markers"]["numbers"]["chance"] == pytest.approx(25.0)
    assert found["language_attack"]["verdict"] == HOLDS  # HLSS drops 50 points, robust HLSS 5
    near_chance = _language_frame({"hlss": [20, 26, 32], "robust_hlss": [50, 51, 52]}, {"hlss": [10, 11, 12], "robust_hlss": [45, 46, 47]})
    found = {c["id"]: c for c in claims(None, None, None, {"models": {}}, near_chance)}
    assert found["language_own_markers"]["verdict"] == UNJUDGED


def _vit_study(extra_seeds=False):
    """DINO on a ViT (dino_vit_s*) and on the CNN (dino_r_s*): seed 0, or seeds 0-2 with `extra_seeds`."""
    vit = {"backbone": "vit_tiny_patch16_224"}
    seeds = range(3) if extra_seeds else range(1)
    models = {**{f"dino_vit_s{i}": {"method": {"name": "dino"}, "seed": i, "model": vit} for i in seeds},
              **{f"dino_r_s{i}": {"method": {"name": "dino"}, "seed": i} for i in seeds}}
    return validate({"models": _models(models), **CFG}, "study")


@pytest.mark.parametrize("vit_worst, verdict", [(70.0, HOLDS), (41.0, UNJUDGED), (5.0, FAILS)])
def test_vit_vs_cnn_claims_compare_across_backbones(vit_worst, verdict):
    values = {**BASE, "dino_vit_s0": (60.0, vit_worst, 50.0), "dino_r_s0": (55.0, 40.0, 45.0)}
    found = {c["id"]: c for c in claims(whitebox_frame(values, methods={"dino_vit_s0": "dino", "dino_r_s0": "dino"}),
                                        None, None, _vit_study())}
    vs_base, vs_dino = found["vit_vs_cnn_baseline"], found["vit_vs_cnn_dino"]
    assert vs_base["backbone"] == "ViT vs CNN" and "vit_tiny_patch16_224" in vs_base["measured"]
    assert vs_base["numbers"]["means"] == {"dino_vit": vit_worst, "hidisc_cnn": 11.0}
    assert vs_dino["numbers"]["means"] == {"dino_vit": vit_worst, "dino_cnn": 40.0}
    # one seed each: no seed noise to judge the gap against, however large
    assert vs_dino["verdict"] == UNJUDGED and "fewer than 3 seeds" in vs_dino["reason"]
    # three seeds each (worst case x + i): 41 vs 40 with sd 1 on both sides is inside the noise
    names = {f"{m}_s{i}": "dino" for m in ("dino_vit", "dino_r") for i in range(3)}
    values = {**BASE, **{f"dino_vit_s{i}": (60.0, vit_worst - 1 + i, 50.0) for i in range(3)},
              **{f"dino_r_s{i}": (55.0, 39.0 + i, 45.0) for i in range(3)}}
    found = {c["id"]: c for c in claims(whitebox_frame(values, methods=names), None, None, _vit_study(extra_seeds=True))}
    vs_dino = found["vit_vs_cnn_dino"]
    assert vs_dino["numbers"]["means"] == {"dino_vit": pytest.approx(vit_worst), "dino_cnn": pytest.approx(40.0)}
    assert vs_dino["verdict"] == verdict
    assert "vit_vs_cnn_dino" in ROBUSTNESS_CLAIMS


def test_no_vit_claims_without_a_dino_vit(study):
    assert not [c for c in claims(whitebox_frame(), None, None, study) if c["id"].startswith("vit_vs_cnn")]


def test_a_backbone_with_none_of_the_papers_methods_gets_no_paper_claims():
    """DINO's ViT alone on its backbone: the HiDisc/HSAT claims are judged on the CNN only."""
    values = {**BASE, "dino_vit_s0": (60.0, 20.0, 50.0)}
    found = claims(whitebox_frame(values, methods={"dino_vit_s0": "dino"}), None, None, _vit_study())
    worst = [c for c in found if c["id"] == "whitebox_worst_case"]
    assert len(worst) == 1 and not is_vit(worst[0]["backbone"])
    assert any(c["id"] == "vit_vs_cnn_baseline" for c in found)


def _dino_pair_study():
    vit = {"backbone": "vit_tiny_patch16_224"}
    models = {**{f"dino_vit_s{i}": {"method": {"name": "dino"}, "seed": i, "model": vit} for i in range(3)},
              **{f"rdino_vit_s{i}": {"method": {"name": "robust_dino"}, "seed": i, "model": vit} for i in range(3)}}
    return validate({"models": _models(models), **CFG}, "study")


def test_robust_dino_claims_compare_the_pair_on_its_backbone():
    """Robust DINO vs DINO, worst case and same-method transfer, judged on their own backbone;
    reversing the numbers reverses the verdicts."""
    study = _dino_pair_study()
    methods = {**{f"dino_vit_s{i}": "dino" for i in range(3)}, **{f"rdino_vit_s{i}": "robust_dino" for i in range(3)}}

    def run(dino_worst, robust_worst, dino_drop, robust_drop):
        values = {**BASE, **{f"dino_vit_s{i}": (60.0, dino_worst + i, 30.0) for i in range(3)},
                  **{f"rdino_vit_s{i}": (50.0, robust_worst + i, 40.0) for i in range(3)}}
        drops = {}
        for prefix, d in (("dino_vit", dino_drop), ("rdino_vit", robust_drop)):
            names = [f"{prefix}_s{i}" for i in range(3)]
            drops.update({(s, t): d + (names.index(s) - 1) for s in names for t in names if s != t})
        drops[("dino_vit_s0", "rdino_vit_s0")] = 90.0  # cross-method: not a same-method pair
        found = [c for c in claims(whitebox_frame(values, methods=methods), transfer_frame(drops), None, study)
                 if c["id"].startswith("robust_dino")]
        assert len(found) == 2  # one pair: the ViT's
        return tuple({c["id"]: c for c in found}[k] for k in ("robust_dino_worst_case", "robust_dino_transfer"))

    worst, transfer = run(dino_worst=2.0, robust_worst=20.0, dino_drop=25.0, robust_drop=3.0)
    assert worst["verdict"] == HOLDS and is_vit(worst["backbone"])
    assert worst["numbers"]["means"] == {"robust_dino": 21.0, "dino": 3.0}
    assert transfer["verdict"] == HOLDS and transfer["numbers"]["ns"] == {"dino": 3, "robust_dino": 3}  # target seeds
    assert transfer["numbers"]["means"]["dino"] == pytest.approx(25.0)
    worst, transfer = run(dino_worst=20.0, robust_worst=2.0, dino_drop=3.0, robust_drop=25.0)
    assert worst["verdict"] == FAILS and transfer["verdict"] == FAILS
    assert {"robust_dino_worst_case", "robust_dino_transfer"} <= set(ROBUSTNESS_CLAIMS)
    # DINO without its robust twin (the ViT-vs-CNN study) gets no robust-DINO claims
    assert not [c for c in claims(whitebox_frame({**BASE, "dino_vit_s0": (60.0, 20.0, 50.0)}, methods={"dino_vit_s0": "dino"}),
                                  None, None, _vit_study()) if c["id"].startswith("robust_dino")]
