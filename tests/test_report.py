"""Tables and figures from small hand-made tidy CSVs: shapes, mean ± std over seeds, headline claims."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from hsat.config import validate
from hsat.errors import HSATError
from hsat.report import collect, method_label, read_tidy
from hsat.report.figures import FIGURES, attack_steps, read_run_logs, save_figure, transfer_heatmap, write_figures
from hsat.report.tables import SUMMARY_COLUMNS, headline, table1, table2, table3, table4, transfer_summary, write_tables

MODELS = {
    "hidisc_s0": {"method": {"name": "hidisc"}, "seed": 0},
    "hidisc_s1": {"method": {"name": "hidisc"}, "seed": 1},
    "hidisc_s2": {"method": {"name": "hidisc"}, "seed": 2},
    "hsat_s0": {"method": {"name": "hsat"}, "seed": 0},
    "hsat_s1": {"method": {"name": "hsat"}, "seed": 1},
    "hsat_s2": {"method": {"name": "hsat"}, "seed": 2},
    "hsat_patch": {"method": {"name": "hsat_patch"}},
    "hsat_slide": {"method": {"name": "hsat_slide"}},
    "lmax_p": {"method": {"name": "hsat_lmax_patch"}},
    "lmax_ps": {"method": {"name": "hsat_lmax_patch_slide"}},
}
SEEDED = [m for m, spec in MODELS.items() if spec["method"]["name"] in ("hidisc", "hsat")]
LEVELS = ("patch", "slide", "patient")
# (attack, objectives it runs under): BIM/MI-FGSM from a random start under the label-free objective.
ATTACKS = [
    ("pgd", ("feature", "linear_ce", "knn_soft")),
    ("bim_r", ("feature",)),
    ("mifgsm_r", ("feature",)),
    ("bim", ("linear_ce",)),
    ("mifgsm", ("linear_ce",)),
]
AA_VERSION = "apgd-ce+apgd-t"


def method_of(model: str) -> str:
    return MODELS[model]["method"]["name"]


@pytest.fixture(scope="module")
def study():
    models = {k: {**v, "group": "scratch"} for k, v in MODELS.items()}
    return validate({"models": models, "pretrain": {"model": {"backbone": "test_resnet"}}}, "study")


@pytest.fixture(scope="module")
def study_aa(study):
    """The study with the AutoAttack version recorded, as the extended evaluation config has it."""
    cfg = copy.deepcopy(study)
    cfg.setdefault("evaluation", {}).setdefault("whitebox", {})["autoattack"] = {"version": AA_VERSION}
    return cfg


@pytest.fixture(scope="module")
def whitebox(study) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for model, spec in MODELS.items():
        base = dict(model=model, method=method_of(model), group="scratch", seed=spec.get("seed", 0))
        row = lambda attack, eps, objective, classifier, level, acc, steps=10, top=None: rows.append(dict(  # noqa: E731
            base, attack=attack, eps=eps, steps=steps, objective=objective, classifier=classifier, level=level,
            acc=acc, mca=acc - 1.0, top2=acc if top is None else top, top3=acc if top is None else top, map=acc if top is None else top))
        for classifier in ("knn", "linear"):
            for level in LEVELS:
                row("none", 0, "none", classifier, level, float(rng.uniform(60, 90)), steps=0)
        for eps in (4, 8):
            for classifier in ("knn", "linear"):
                for level in LEVELS:
                    accs = []
                    for attack, objectives in ATTACKS:
                        for objective in objectives:
                            if objective == "knn_soft" and classifier != "knn":
                                continue
                            accs.append(float(rng.uniform(10, 90)))
                            row(attack, eps, objective, classifier, level, accs[-1])
                    if model in SEEDED:
                        accs.append(float(rng.uniform(10, 90)))
                        row("autoattack", eps, "linear_probe", classifier, level, accs[-1])
                    # Robust only if correct under every attack: at most the weakest single attack.
                    row("worst_case", eps, "all", classifier, level, min(accs) - float(rng.uniform(0, 3)), steps=0, top=np.nan)
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def transfer() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for s in SEEDED:
        for t in SEEDED:
            if s == t:
                continue
            for level in LEVELS:
                drop = float(rng.uniform(-5, 40))
                rows.append(dict(surrogate=s, target=t, attack="pgd", eps=8, steps=10, objective="feature",
                                 classifier="knn", level=level, acc=50.0, mca=49.0, clean_acc=60.0,
                                 clean_mca=59.0, acc_drop=drop, mca_drop=drop + 0.5))
    # Another setting than the configured one (pgd eps 8): the tables must leave it out.
    decoy = pd.DataFrame(rows[:6]).assign(eps=4, acc_drop=99.0, mca_drop=99.0)
    return pd.concat([pd.DataFrame(rows), decoy], ignore_index=True)


@pytest.fixture(scope="module")
def sanity() -> pd.DataFrame:
    rows = []
    add = lambda model, check, param, value, acc, passed, criterion: rows.append(dict(  # noqa: E731
        model=model, check=check, param=param, value=value, acc=acc, passed=passed, attack="pgd", eps=8, steps=5,
        objective="feature", classifier="knn", criterion=criterion))
    for model in ("hidisc_s0", "hsat_s0"):
        for i, steps in enumerate((1, 5, 10)):
            add(model, "steps", "steps", steps, 50.0 - 5 * i, True, "acc non-increasing in steps")
            add(model, "steps_feature_knn", "steps", steps, 55.0 - 4 * i, True, "acc non-increasing in steps")
        add(model, "restarts", "restart", 1, 41.0, True, "worst of restarts <= each restart")
        add(model, "restarts", "restart", 2, 39.0, True, "worst of restarts <= each restart")
        add(model, "restarts", "worst_of", 2, 37.0, True, "worst of restarts <= each restart")
        for i, eps in enumerate((4, 8, 32, 64)):
            add(model, "eps", "eps", eps, 60.0 - 15 * i, True, "acc non-increasing in eps")
            add(model, "noise", "eps", eps, 70.0 - i, True, "uniform noise costs less than the attack")
        add(model, "large_eps_label", "eps", 64, 3.0, True, "acc <= chance + 5")
        add(model, "large_eps_feature", "eps", 64, 10.0, True, "acc <= chance + 5")
        add(model, "above_clean", "pgd/feature/knn", 8, 40.0, True, "attacked acc <= clean acc")
        add(model, "above_clean", "bim_r/feature/knn", 8, 42.0, True, "attacked acc <= clean acc")
    add("hsat_s0", "whitebox_vs_transfer", "surrogate", "hidisc_s0", 40.0, True, "white-box acc <= transfer acc")
    add("hidisc_s0", "whitebox_vs_transfer", "surrogate", "hsat_s0", 45.0, True, "white-box acc <= transfer acc")
    df = pd.DataFrame(rows)
    # One failed point: accuracy rose with eps for hsat_s0 at eps 64.
    bad = (df["model"] == "hsat_s0") & (df["check"] == "eps") & (df["value"] == 64)
    df.loc[bad, ["acc", "passed"]] = [50.0, False]
    return df


def _sel(df, **kw):
    for k, v in kw.items():
        df = df[df[k] == v]
    return df


def _cell(values: pd.Series) -> str:
    return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


# ----------------------------------------------------------------------------- Table 1


def test_table1_paper_layout_acc_per_level(whitebox, study_aa):
    table, caption = table1(whitebox, study_aa)
    # One row per method (seeds pooled), n counts the models.
    assert len(table) == 6
    n = dict(zip(table.index.get_level_values("Method"), table.index.get_level_values("n")))
    assert n["HiDisc"] == 3 and n["HSAT"] == 3 and n["HSAT-Patch"] == 1
    # Columns grouped by level, Acc only: clean, three attacks and the worst case at each eps.
    assert list(dict.fromkeys(table.columns.get_level_values("Level"))) == ["patch", "slide", "patient"]
    expected = ["Clean", "PGD 4/255", "PGD 8/255", "BIM 4/255", "BIM 8/255", "MI-FGSM 4/255", "MI-FGSM 8/255",
                "Worst case 4/255", "Worst case 8/255"]
    assert list(table["patch"].columns) == expected
    assert table.shape[1] == len(expected) * 3
    # Primary setting: knn classifier, feature objective (first of the configured lists).
    assert "knn" in caption and "feature" in caption
    assert "random" in caption and f"AutoAttack version: {AA_VERSION}" in caption
    hsat = table.xs("HSAT", level="Method")
    knn_patch = dict(method="hsat", classifier="knn", level="patch", eps=8)
    assert hsat[("patch", "PGD 8/255")].iloc[0] == _cell(_sel(whitebox, attack="pgd", objective="feature", **knn_patch)["acc"])
    # BIM and MI-FGSM under the feature objective are the random-start runs.
    assert hsat[("patch", "BIM 8/255")].iloc[0] == _cell(_sel(whitebox, attack="bim_r", objective="feature", **knn_patch)["acc"])
    assert hsat[("patch", "MI-FGSM 8/255")].iloc[0] == _cell(_sel(whitebox, attack="mifgsm_r", **knn_patch)["acc"])
    assert hsat[("patch", "Worst case 8/255")].iloc[0] == _cell(_sel(whitebox, attack="worst_case", **knn_patch)["acc"])
    single = table.xs("HSAT-Patch", level="Method")[("slide", "Clean")].iloc[0]
    clean = _sel(whitebox, model="hsat_patch", attack="none", classifier="knn", level="slide")["acc"]
    assert single == f"{clean.iloc[0]:.1f}"


def test_table1_caption_without_autoattack_or_random_start(whitebox, study):
    plain = whitebox[whitebox["attack"] != "autoattack"].copy()
    plain["attack"] = plain["attack"].replace({"bim_r": "bim", "mifgsm_r": "mifgsm"})
    plain = plain.drop_duplicates(subset=["model", "attack", "eps", "objective", "classifier", "level"])
    table, caption = table1(plain, study)
    assert "AutoAttack" not in caption and "random" not in caption
    assert "BIM 8/255" in set(table.columns.get_level_values("Condition"))


def test_table1_autoattack_version_unrecorded(whitebox, study):
    old = copy.deepcopy(study)  # a config from before AutoAttack had settings
    old.get("evaluation", {}).get("whitebox", {}).pop("autoattack", None)
    _, caption = table1(whitebox, old)
    assert "AutoAttack version: not recorded" in caption


# ----------------------------------------------------------------------------- Tables 2-4


def test_table2_matrix_and_average(transfer, study):
    table, _ = table2(transfer, study)
    patch = table.xs("patch", level="Level")
    assert list(patch.index) == [*SEEDED, "Average"]
    main = _sel(transfer, eps=8, level="patch")
    # Average over surrogates of the drop on one target; the eps-4 decoy stays out.
    assert patch.loc["Average", ("hsat_s0", "Acc-D")] == f"{_sel(main, target='hsat_s0')['acc_drop'].mean():.1f}"
    assert patch.loc["hidisc_s0", ("hidisc_s0", "Acc-D")] == "–"  # no diagonal in the data
    pair = _sel(main, surrogate="hsat_s1", target="hidisc_s2")["mca_drop"].iloc[0]
    assert patch.loc["hsat_s1", ("hidisc_s2", "MCA-D")] == f"{pair:.1f}"


@pytest.mark.parametrize("level", LEVELS)
def test_transfer_summary_same_vs_other_method(transfer, study, level):
    summ = transfer_summary(transfer, study)
    assert list(summ.columns) == SUMMARY_COLUMNS
    main = _sel(transfer, eps=8, level=level)
    smethod, tmethod = main["surrogate"].map(method_of), main["target"].map(method_of)
    for target in ("hidisc", "hsat"):
        for kind, pick in (("same_method", smethod == target), ("other_method", smethod != target)):
            cells = main[(tmethod == target) & pick]
            row = _sel(summ, target_method=target, surrogate_kind=kind, level=level)
            assert len(row) == 1
            assert row["acc_drop_mean"].iloc[0] == pytest.approx(cells["acc_drop"].mean())
            assert row["acc_drop_std"].iloc[0] == pytest.approx(cells["acc_drop"].std(ddof=1))
            assert row["mca_drop_mean"].iloc[0] == pytest.approx(cells["mca_drop"].mean())
            assert row["n_pairs"].iloc[0] == len(cells)
    assert set(_sel(summ, surrogate_kind="other_method", target_method="hsat")["surrogate_method"]) == {"hidisc"}


def test_transfer_summary_empty(study):
    assert transfer_summary(None, study).empty
    assert list(transfer_summary(pd.DataFrame(), study).columns) == SUMMARY_COLUMNS


def test_table3_and_table4_add_worst_case_at_largest_eps(whitebox, study):
    t3, caption = table3(whitebox, study)
    assert list(dict.fromkeys(t3.columns.get_level_values("Condition"))) == ["Clean", "PGD 8/255", "Worst case 8/255"]
    assert "worst case" in caption
    cell = t3.xs("HSAT-Patch", level="Method")[("Worst case 8/255", "Acc", "patch")].iloc[0]
    expect = _sel(whitebox, model="hsat_patch", attack="worst_case", eps=8, classifier="knn", level="patch")["acc"]
    assert cell == f"{expect.iloc[0]:.1f}"
    t4, _ = table4(whitebox, study)
    assert list(t4.index.get_level_values("L_max levels")) == ["patch", "slide + patch", "patient + slide + patch"]
    assert set(t4.index.get_level_values("L_min levels")) == {"patient + slide + patch"}
    assert "Worst case 8/255" in set(t4.columns.get_level_values("Condition"))


def test_table3_shows_robust_dino_by_its_positives_when_the_study_varies_them(whitebox, study):
    """Robust DINO's hierarchy option (method.dino.positives) is Table 3's level for DINO: one row per
    positives value after HSAT's rows, patch -> slide -> patient; none while every robust DINO model uses
    the same positives (so a study without the option keeps its Table 3)."""
    positives = {"rdino_patient": "patient", "rdino_patch": "patch", "rdino_slide": "slide"}
    extra = []
    for i, (model, pos) in enumerate(positives.items()):
        rows = whitebox[whitebox["model"] == "hsat_s0"].copy()
        rows["model"], rows["method"] = model, "robust_dino"
        rows["acc"] = rows["acc"] - 10.0 * (i + 1)
        extra.append(rows)
    wb = pd.concat([whitebox, *extra], ignore_index=True)

    def study_with(pos_of):
        models = {k: {**v, "group": "scratch"} for k, v in MODELS.items()}
        for model, pos in pos_of.items():
            models[model] = {"method": {"name": "robust_dino", "dino": {"positives": pos}}, "group": "scratch"}
        return validate({"models": models, "pretrain": {"model": {"backbone": "test_resnet"}}}, "study")

    t3, caption = table3(wb, study_with(positives))
    methods = list(t3.index.get_level_values("Method"))
    assert methods == ["HSAT-Patient", "HSAT-Patch", "HSAT-Slide", "Robust DINO (positives: patch)",
                       "Robust DINO (positives: slide)", "Robust DINO (positives: patient)"]
    assert "method.dino.positives" in caption
    cell = t3.xs("Robust DINO (positives: slide)", level="Method")[("Worst case 8/255", "Acc", "patch")].iloc[0]
    expect = _sel(wb, model="rdino_slide", attack="worst_case", eps=8, classifier="knn", level="patch")["acc"]
    assert cell == f"{expect.iloc[0]:.1f}"

    same, caption = table3(wb, study_with({m: "patch" for m in positives}))
    assert list(same.index.get_level_values("Method")) == ["HSAT-Patient", "HSAT-Patch", "HSAT-Slide"]
    assert "positives" not in caption


def test_write_tables_files_and_long_table1(whitebox, transfer, study_aa, tmp_path):
    paths = write_tables(whitebox, transfer, study_aa, tmp_path)
    for i in range(1, 6):
        for ext in ("csv", "md", "tex"):
            assert (tmp_path / f"table{i}.{ext}").stat().st_size > 0
    assert len(paths) == 17 and (tmp_path / "table2_summary.csv") in paths and (tmp_path / "table1_full.csv") in paths
    assert "\\begin{table}" in (tmp_path / "table1.tex").read_text()
    md = (tmp_path / "table1.md").read_text()
    assert "patch Worst case 8/255" in md and "patient BIM 4/255" in md and "MCA" not in md.split("\n\n")[1]

    long = pd.read_csv(tmp_path / "table1.csv")
    assert {"group", "method", "method_label", "backbone", "classifier", "objective", "attack", "eps", "level",
            "acc_mean", "acc_std", "mca_mean", "mca_std", "n"} <= set(long.columns)
    settings = set(zip(long["classifier"], long["objective"], long["attack"]))
    assert {("linear", "linear_probe", "autoattack"), ("knn", "all", "worst_case"), ("knn", "feature", "bim_r"),
            ("knn", "knn_soft", "pgd"), ("linear", "none", "none")} <= settings
    # One clean row per (method, classifier, level): clean numbers do not repeat per objective.
    assert not long[long["attack"] == "none"].duplicated(["method", "classifier", "level"]).any()
    aa = _sel(long, method="hsat", attack="autoattack", classifier="linear", eps=8, level="patch")
    expect = _sel(whitebox, method="hsat", attack="autoattack", classifier="linear", eps=8, level="patch")
    assert aa["acc_mean"].iloc[0] == pytest.approx(expect["acc"].mean())
    assert aa["mca_std"].iloc[0] == pytest.approx(expect["mca"].std(ddof=1))
    assert aa["n"].iloc[0] == 3

    t2md = (tmp_path / "table2.md").read_text()
    assert "Table 2 (summary)" in t2md and "same method, other seed" in t2md and "hsat_s2" in t2md
    summary = pd.read_csv(tmp_path / "table2_summary.csv")
    assert len(summary) == len(transfer_summary(transfer, study_aa)) and (summary["n_pairs"] > 0).all()
    t3 = pd.read_csv(tmp_path / "table3.csv")
    assert set(t3["Method"]) == {"HSAT-Patch", "HSAT-Slide", "HSAT-Patient"}
    assert "Worst case 8/255 Acc patch" in t3.columns


# ----------------------------------------------------------------------------- metrics.json


def test_headline_judges_robust_gain_on_worst_case(whitebox, study):
    pick = dict(eps=8, classifier="knn", level="patch")
    per_method = lambda attack, method, **kw: _sel(whitebox, method=method, attack=attack, **pick, **kw)["acc"]  # noqa: E731
    hsat_wc, base_wc = per_method("worst_case", "hsat"), per_method("worst_case", "hidisc")
    hsat_pgd, base_pgd = per_method("pgd", "hsat", objective="feature"), per_method("pgd", "hidisc", objective="feature")
    wc_gain, pgd_gain = hsat_wc.mean() - base_wc.mean(), hsat_pgd.mean() - base_pgd.mean()
    assert wc_gain != pytest.approx(pgd_gain)
    # A margin between the two gains: the verdict depends on which one is judged.
    margin = (wc_gain + pgd_gain) / 2

    out = headline(whitebox, study, margin=margin)
    assert out["worst_case_eps"] == 8 and out["pgd_eps"] == 8
    h = out["groups"]["scratch:test_resnet"]
    assert h["hsat_worst_case_acc"]["n"] == 3
    assert h["hsat_worst_case_acc"]["mean"] == pytest.approx(hsat_wc.mean())
    assert h["hsat_worst_case_acc"]["std"] == pytest.approx(hsat_wc.std(ddof=1))
    assert h["hidisc_worst_case_acc"]["mean"] == pytest.approx(base_wc.mean())
    assert h["hsat_minus_baseline_worst_case_acc"] == pytest.approx(wc_gain)
    assert h["robust_gain_judged_on"].startswith("worst_case")
    assert h["claim_robust_gain_holds"] == bool(wc_gain >= margin)
    # The feature-attack PGD figure stays beside it.
    assert h["hsat_pgd_acc"]["std"] == pytest.approx(hsat_pgd.std(ddof=1))
    assert h["hsat_minus_baseline_pgd_acc"] == pytest.approx(pgd_gain)
    clean = dict(attack="none", classifier="knn", level="patch")
    diff = _sel(whitebox, method="hsat", **clean)["acc"].mean() - _sel(whitebox, method="hsat_patch", **clean)["acc"].mean()
    assert h["hsat_minus_hsat_patch_clean_acc"] == pytest.approx(diff)
    assert h["claim_clean_gain_holds"] == bool(diff > 0)

    # Without worst-case rows the claim falls back to PGD, and says so.
    old = headline(whitebox[whitebox["attack"] != "worst_case"], study, margin=margin)["groups"]["scratch:test_resnet"]
    assert old["robust_gain_judged_on"].startswith("pgd")
    assert old["claim_robust_gain_holds"] == bool(pgd_gain >= margin) != h["claim_robust_gain_holds"]
    assert old["hsat_worst_case_acc"]["n"] == 0 and old["hsat_minus_baseline_worst_case_acc"] is None


def test_headline_max_attack_above_clean(whitebox, study):
    out = headline(whitebox, study)["max_attack_above_clean"]
    assert set(out) == set(MODELS)
    for model in MODELS:
        rows = _sel(whitebox, model=model, classifier="knn", level="patch")
        attacked = rows[rows["attack"] != "none"]
        top = attacked.loc[attacked["acc"].idxmax()]
        assert out[model]["value"] == pytest.approx(top["acc"] - rows.loc[rows["attack"] == "none", "acc"].mean())
        assert (out[model]["attack"], out[model]["eps"]) == (top["attack"], top["eps"])


def test_headline_transfer_and_json(whitebox, transfer, sanity, study):
    assert "transfer" not in headline(whitebox, study)
    out = headline(whitebox, study, sanity, transfer=transfer)
    main = _sel(transfer, eps=8, level="patch")
    smethod, tmethod = main["surrogate"].map(method_of), main["target"].map(method_of)
    for method in ("hidisc", "hsat"):
        entry = out["transfer"]["by_target"][method]
        same = main[(smethod == method) & (tmethod == method)]
        other = main[(smethod != method) & (tmethod == method)]
        assert entry["same_method"]["acc_drop_mean"] == pytest.approx(same["acc_drop"].mean())
        assert entry["same_method"]["n_pairs"] == len(same)
        (other_entry,) = entry["other_method"].values()
        assert other_entry["acc_drop_mean"] == pytest.approx(other["acc_drop"].mean())
    assert out["sanity_checks"] == len(sanity) and out["sanity_failed"] == int((~sanity["passed"]).sum())
    json.dumps(out, allow_nan=False)  # JSON-serialisable, no NaN


# ----------------------------------------------------------------------------- figures


def test_sanity_figure_one_panel_per_check_with_status(sanity, tmp_path):
    fig = attack_steps(sanity)
    titles = {ax.get_title().split(":")[0]: ax for ax in fig.axes if ax.get_title()}
    checks = list(dict.fromkeys(sanity["check"]))
    assert list(titles) == checks
    assert titles["eps"].get_title().startswith("eps: FAILED (1)")
    assert all(titles[c].get_title().startswith(f"{c}: passed") for c in checks if c != "eps")
    assert "acc <= chance + 5" in titles["large_eps_label"].get_title()
    # Restarts: each restart's accuracy, then the worst of them.
    assert [t.get_text() for t in titles["restarts"].get_xticklabels()] == ["1", "2", "worst"]
    # Non-numeric values (surrogate names) are drawn per model, one tick per model.
    assert [t.get_text() for t in titles["whitebox_vs_transfer"].get_xticklabels()] == ["hidisc_s0", "hsat_s0"]
    paths = save_figure(fig, tmp_path, "attack_steps")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_transfer_heatmap_diverging_and_readable(transfer, study):
    fig = transfer_heatmap(transfer, study)
    ax = fig.axes[0]
    mesh = ax.collections[0]
    main = _sel(transfer, eps=8)
    assert mesh.norm.vmin == pytest.approx(-mesh.norm.vmax)
    assert mesh.norm.vmax == pytest.approx(main.groupby(["level", "surrogate", "target"])["acc_drop"].mean().abs().max())
    # Diverging: no drop is near-white, a negative drop (the attack helped) blue, a positive one red.
    colour = lambda v: mesh.cmap(mesh.norm(v))  # noqa: E731
    assert min(colour(0.0)[:3]) > 0.9
    low, high = colour(-mesh.norm.vmax / 2), colour(mesh.norm.vmax / 2)
    assert low[2] > low[0] and high[0] > high[2]
    assert {t.get_rotation() for t in ax.get_yticklabels()} == {0.0}
    assert len(ax.get_yticklabels()) == len(SEEDED)


def test_figures_written_for_empty_inputs(study, tmp_path):
    empty = pd.DataFrame()
    paths = write_figures(empty, empty, empty, study, tmp_path / "runs", tmp_path / "emb", tmp_path)
    assert len(paths) == 2 * len(FIGURES)
    assert all(p.stat().st_size > 1000 for p in paths)


# ----------------------------------------------------------------------------- CLI


def test_a_result_csv_that_cannot_be_parsed_is_named(tmp_path):
    bad = tmp_path / "whitebox.csv"
    bad.write_bytes(b"model,acc\n\xff\xfe,\x00\n")
    with pytest.raises(HSATError, match="whitebox.csv: not a result CSV"):
        read_tidy(bad)
    bad.write_text('model,acc\nhsat_s0,1,2,3\n"unterminated\n')
    with pytest.raises(HSATError, match="whitebox.csv: not a result CSV"):
        read_tidy(bad)


def test_run_logs_are_read_for_the_study_models_only(tmp_path):
    # results/ may hold runs of another study config (make study-all, then make study).
    for model in ("hsat_s0", "dino_vit_s0"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "log.jsonl").write_text(json.dumps({"step": 1, "loss_total": 1.0}) + "\n")
    assert set(read_run_logs(tmp_path)["model"]) == {"hsat_s0", "dino_vit_s0"}
    assert set(read_run_logs(tmp_path, ["hsat_s0", "hidisc_s0"])["model"]) == {"hsat_s0"}


def test_collect_skips_empty_inputs(whitebox, tmp_path):
    a, b, empty = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "e.csv"
    whitebox.iloc[:5].to_csv(a, index=False)
    whitebox.iloc[5:9].to_csv(b, index=False)
    empty.write_text("")
    out = collect([a, empty, b], tmp_path / "all.csv")
    assert len(out) == 9 and len(read_tidy(tmp_path / "all.csv")) == 9


def test_cli_tables_and_figures(whitebox, transfer, sanity, study, tmp_path):
    from safetensors.numpy import save_file

    from hsat.cli import main
    from hsat.io import write_yaml

    cfg = tmp_path / "study.yaml"
    write_yaml(cfg, study)
    wb, tr, sa = tmp_path / "wb.csv", tmp_path / "tr.csv", tmp_path / "sa.csv"
    whitebox.to_csv(wb, index=False)
    transfer.to_csv(tr, index=False)
    sanity.to_csv(sa, index=False)
    runs = tmp_path / "runs"
    (runs / "hsat_s0").mkdir(parents=True)
    (runs / "hsat_s0" / "log.jsonl").write_text("".join(
        json.dumps({"step": s, "eps": s / 2, "loss_clean_patch": 5 - s / 10, "loss_adv_patch": 6 - s / 10}) + "\n" for s in range(0, 20, 5)))
    emb = tmp_path / "emb" / "hsat_s0"
    emb.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"train_features": rng.normal(size=(10, 8)).astype(np.float32),
               "val_features": rng.normal(size=(30, 8)).astype(np.float32)}, str(emb / "features.safetensors"))
    pd.DataFrame({"patient": [f"p{i % 5}" for i in range(40)], "label": [f"c{i % 3}" for i in range(40)],
                  "split": ["train"] * 10 + ["val"] * 30}).to_csv(emb / "index.csv", index=False)

    metrics = tmp_path / "metrics.json"
    assert main(["report", "tables", "--config", str(cfg), "--whitebox", str(wb), "--transfer", str(tr),
                 "--out-dir", str(tmp_path / "tables"), "--metrics", str(metrics), "--sanity", str(sa)]) == 0
    m = json.loads(metrics.read_text())
    assert m["sanity_failed"] == 1 and list(m["groups"]) == ["scratch:test_resnet"]
    assert m["groups"]["scratch:test_resnet"]["robust_gain_judged_on"].startswith("worst_case")
    figs = tmp_path / "figures"
    assert main(["report", "figures", "--config", str(cfg), "--whitebox", str(wb), "--transfer", str(tr), "--sanity", str(sa),
                 "--runs-dir", str(runs), "--embeddings-dir", str(tmp_path / "emb"), "--out-dir", str(figs)]) == 0
    for name in FIGURES:
        assert (figs / f"{name}.png").stat().st_size > 1000
        assert (figs / f"{name}.pdf").stat().st_size > 1000


def test_table5_puts_every_method_side_by_side_per_classifier(whitebox, study_aa):
    from hsat.report.tables import table5

    t5, caption = table5(whitebox, study_aa)
    assert set(t5.index.get_level_values("Classifier")) == set(whitebox["classifier"])
    assert set(t5.index.get_level_values("Method")) == {method_label(m) for m in whitebox["method"].unique()}
    conditions = set(t5.columns.get_level_values("Condition"))
    assert "Clean" in conditions and any(c.startswith("PGD") for c in conditions)
    assert "Table 5" in caption
    # the MIL head is attacked through its own objective: the caption names each classifier's
    mil = whitebox[(whitebox["level"] == "slide") & (whitebox["classifier"] == "knn")].copy()
    mil["classifier"] = "abmil"
    mil.loc[mil["attack"] == "pgd", "objective"] = "abmil_ce"
    mil = mil[mil["objective"].isin(["none", "abmil_ce", "all"])]
    _, caption = table5(pd.concat([whitebox, mil], ignore_index=True), study_aa)
    assert "abmil_ce for abmil" in caption and "feature for knn" in caption, caption


# ----------------------------------------------------------------------------- names and colours


def test_compact_table1_has_the_papers_columns_and_the_full_one_is_kept(whitebox, transfer, study_aa, tmp_path):
    from hsat.report.tables import table1_compact

    table, caption = table1_compact(whitebox, study_aa)
    assert list(table.columns) == ["n", "Clean", "PGD 4/255", "PGD 8/255", "BIM 4/255", "BIM 8/255", "MI-FGSM 4/255",
                                   "MI-FGSM 8/255", "Worst case 8/255"]
    assert table.index.name == "Method" and table["n"].tolist() == [3, 3, 1, 1, 1, 1]
    # Methods in registry order, seeds pooled; patch level of the kNN classifier.
    assert list(table.index) == ["HiDisc", "HSAT", "HSAT-Patch", "HSAT-Slide",
                                                            "HSAT (L_max: patch)", "HSAT (L_max: patch+slide)"]
    assert "patch level" in caption and "knn" in caption
    cell = table.loc["HSAT", "PGD 8/255"]
    assert cell == _cell(_sel(whitebox, method="hsat", attack="pgd", objective="feature", classifier="knn", level="patch", eps=8)["acc"])

    write_tables(whitebox, transfer, study_aa, tmp_path)
    tex = (tmp_path / "table1.tex").read_text()
    tabular = tex.split("\\end{table}")[0].split("\\begin{tabular}")[1]
    assert "MI-FGSM 8/255" in tabular and tabular.count("Clean") == 1  # one level, not three
    full = pd.read_csv(tmp_path / "table1_full.csv")
    assert {"patch Clean", "patient Worst case 8/255"} <= set(full.columns) and len(full) == len(table)


def _with_head_protocol(whitebox: pd.DataFrame) -> pd.DataFrame:
    """The tidy frame with the head protocol's rows: each feature-objective attack again under
    `head`, 5 points lower (the paper's released evaluation attacks the projection head)."""
    head = whitebox[whitebox["objective"] == "feature"].assign(objective="head")
    head["acc"] -= 5.0
    return pd.concat([whitebox, head], ignore_index=True)


def test_compact_table1_shows_both_paper_protocols_then_the_worst_case(whitebox, study_aa):
    from hsat.report.tables import table1_compact

    both = _with_head_protocol(whitebox)
    table, caption = table1_compact(both, study_aa)
    attacks = ["PGD 4/255", "PGD 8/255", "BIM 4/255", "BIM 8/255", "MI-FGSM 4/255", "MI-FGSM 8/255"]
    assert list(table.columns) == ["n", "Clean", *[f"{a} (feature)" for a in attacks], *[f"{a} (head)" for a in attacks],
                                   "Worst case 8/255"]
    assert table["n"].tolist() == [3, 3, 1, 1, 1, 1]
    pick = dict(method="hsat", classifier="knn", level="patch", eps=8)
    assert table.loc["HSAT", "PGD 8/255 (feature)"] == _cell(_sel(both, attack="pgd", objective="feature", **pick)["acc"])
    assert table.loc["HSAT", "BIM 8/255 (head)"] == _cell(_sel(both, attack="bim_r", objective="head", **pick)["acc"])
    assert table.loc["HSAT", "Worst case 8/255"] == _cell(_sel(both, attack="worst_case", **pick)["acc"])
    assert "feature objective" in caption and "head objective" in caption and "Not in these results" not in caption


def test_compact_table1_says_which_paper_protocol_is_missing(whitebox, study_aa):
    from hsat.report.tables import table1_compact

    table, caption = table1_compact(whitebox, study_aa)  # the fixture ran no head protocol
    assert "Not in these results" in caption and "head protocol" in caption
    assert not any("(head)" in c for c in table.columns)
    only_head = _with_head_protocol(whitebox)
    only_head = only_head[only_head["objective"] != "feature"]
    table, caption = table1_compact(only_head, study_aa)
    assert "PGD 8/255" in table.columns and "feature protocol" in caption and "optimise the head objective" in caption
    neither = whitebox[whitebox["objective"] != "feature"]
    table, caption = table1_compact(neither, study_aa)
    assert "feature and head protocols" in caption and "PGD 8/255" in table.columns  # the primary objective's attacks


def test_white_box_tables_say_how_many_slides_and_patients_were_attacked(whitebox, transfer, study_aa, tmp_path):
    partial = {"patches": 12, "slides": 12, "patients": 7, "slides_total": 14, "patients_total": 7}
    write_tables(_with_head_protocol(whitebox), transfer, study_aa, tmp_path, coverage=partial)
    for name in ("table1", "table3", "table4", "table5"):
        md = (tmp_path / f"{name}.md").read_text()
        assert "12 validation patches from 12 of 14 validation slides and 7 of 7 patients" in md, name
        assert "speak for those alone" in md and "max\\_val\\_patches" in (tmp_path / f"{name}.tex").read_text()
    assert "validation slides" not in (tmp_path / "table2.md").read_text()
    assert "(head)" in (tmp_path / "table1.md").read_text().split("\n\n")[1]  # the compact table, before the notes
    full = {"patches": 210, "slides": 70, "patients": 35, "slides_total": 70, "patients_total": 35}
    write_tables(whitebox, transfer, study_aa, tmp_path, coverage=full)
    md = (tmp_path / "table1.md").read_text()
    assert "from 70 of 70 validation slides and 35 of 35 patients." in md and "speak for those alone" not in md
    write_tables(whitebox, transfer, study_aa, tmp_path)
    assert "validation slides" not in (tmp_path / "table1.md").read_text()


def test_accuracies_carry_wilson_intervals_on_the_attacked_subset(whitebox, transfer, study_aa, tmp_path):
    """With the attacked subset's counts the tables give each accuracy a 95 % Wilson interval:
    in table1.csv and in a note of table1.md; the compact table keeps its cells."""
    from hsat.report.tables import fmt_ci, table1_compact, wilson_interval

    low, high = wilson_interval(50.0, 100)
    assert (round(low, 1), round(high, 1)) == (40.4, 59.6)  # the textbook Wilson interval of 50/100
    assert wilson_interval(0.0, 10)[0] == 0.0 and wilson_interval(0.0, 10)[1] > 25  # a width at 0 %
    assert fmt_ci(45.2, 210).startswith("45.2 [") and fmt_ci(45.2, 0) == "45.2"
    coverage = {"patches": 210, "slides": 70, "patients": 35, "slides_total": 70, "patients_total": 35}
    plain, _ = table1_compact(whitebox, study_aa)
    ci, caption = table1_compact(whitebox, study_aa, coverage=coverage)
    assert list(ci.columns) == list(plain.columns) and "Wilson" in caption
    mean = _sel(whitebox, method="hsat", attack="pgd", objective="feature", classifier="knn", level="patch", eps=8)["acc"]
    assert ci.loc["HSAT", "PGD 8/255"] == fmt_ci(mean.mean(), 3 * 210)  # three seeds pooled

    write_tables(whitebox, transfer, study_aa, tmp_path, coverage=coverage)
    md = (tmp_path / "table1.md").read_text()
    assert " [" not in md.split("\n\n")[1] and "95 % confidence intervals" in md
    long = pd.read_csv(tmp_path / "table1.csv")
    row = _sel(long, method="hsat", attack="pgd", objective="feature", classifier="knn", level="slide", eps=8).iloc[0]
    assert row["examples"] == 70 and row["acc_ci_low"] <= row["acc_mean"] <= row["acc_ci_high"]
    assert (long["acc_ci_low"] <= long["acc_ci_high"]).all()


def test_cli_tables_caption_counts_the_attacked_slides_of_the_manifest(whitebox, transfer, study, tiny_manifest, tmp_path):
    """`hsat report tables --manifest`: the captions give the subset the evaluation attacked."""
    from hsat.cli import main
    from hsat.io import write_yaml

    cfg = tmp_path / "study.yaml"
    write_yaml(cfg, {**study, "evaluation": {"max_val_patches": 10}})  # 14 validation slides: 4 left out
    wb, tr = tmp_path / "wb.csv", tmp_path / "tr.csv"
    whitebox.to_csv(wb, index=False)
    transfer.to_csv(tr, index=False)
    assert main(["report", "tables", "--study", str(cfg), "--whitebox", str(wb), "--transfer", str(tr),
                 "--out-dir", str(tmp_path / "tables"), "--manifest", str(tiny_manifest)]) == 0
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert "10 validation patches from 10 of 14 validation slides and 7 of 7 patients" in md


def test_table2_names_models_by_method_then_seed(transfer, study, tmp_path, whitebox):
    from hsat.report.tables import with_model_labels

    # hidisc_s0's pairs last in the file: the table must not follow the file's order.
    late = transfer["surrogate"].eq("hidisc_s0") | transfer["target"].eq("hidisc_s0")
    shuffled = pd.concat([transfer[~late].iloc[::-1], transfer[late]], ignore_index=True)
    table, caption = table2(shuffled, study)
    assert list(table.xs("patch", level="Level").index) == [*SEEDED, "Average"]
    shown = with_model_labels(table, {"hidisc_s0": "HiDisc s0", "hsat_s2": "HSAT s2"})
    assert list(shown.xs("patch", level="Level").index)[:1] == ["HiDisc s0"]
    assert "HSAT s2" in shown.columns.get_level_values("Target")

    write_tables(whitebox, shuffled, study, tmp_path)
    md = (tmp_path / "table2.md").read_text()
    rows = [line.split("|")[2].strip() for line in md.split("\n\n")[1].splitlines()[2:]]
    expected = ["HiDisc s0", "HiDisc s1", "HiDisc s2", "HSAT s0", "HSAT s1", "HSAT s2", "Average"]
    assert rows == expected * 3  # one block per level
    assert "seed" in caption


def test_model_names_and_the_canonical_model_of_each_method():
    from hsat.report.style import model_names

    info = pd.DataFrame([
        # A variant of HSAT listed first (and first by name): not the method's canonical model.
        ("hsat_clean_adv", "hsat", "scratch, clean+adv", "resnet10t", 0, 2),
        ("hsat_s1", "hsat", "scratch", "resnet10t", 1, 0),
        ("hsat_s0", "hsat", "scratch", "resnet10t", 0, 0),
        ("dino_r10_s0", "dino", "scratch", "resnet10t", 0, 9),
        ("dino_vit_s0", "dino", "scratch", "vit_tiny", 0, 11),
        ("dino_vit_s1", "dino", "scratch", "vit_tiny", 1, 11),
        ("hidisc_s0", "hidisc", "scratch", "resnet10t", 0, 0),
    ], columns=["model", "method", "group", "backbone", "seed", "custom"])
    names = model_names(info)
    assert list(names["model"]) == ["hidisc_s0", "hsat_s0", "hsat_s1", "hsat_clean_adv", "dino_vit_s0", "dino_vit_s1",
                                    "dino_r10_s0"]
    labels = dict(zip(names["model"], names["label"]))
    assert labels["hsat_s1"] == "HSAT s1" and labels["hsat_clean_adv"] == "HSAT (scratch, clean+adv) s0"
    assert labels["dino_vit_s0"] == "DINO s0" and labels["dino_r10_s0"] == "DINO (resnet10t) s0"
    assert set(names.loc[names["canonical"], "model"]) == {"hidisc_s0", "hsat_s0", "dino_vit_s0"}


def test_embedding_map_shows_each_methods_canonical_model(tmp_path):
    from safetensors.numpy import save_file

    from hsat.report.figures import embedding_map, embedding_models

    models = {"hsat_clean_adv": {"method": {"name": "hsat"}, "attack": {"only_adversarial": False}, "seed": 0,
                                 "group": "scratch, clean+adv"},
              "hsat_s1": {"method": {"name": "hsat"}, "seed": 1, "group": "scratch"},
              "hsat_s0": {"method": {"name": "hsat"}, "seed": 0, "group": "scratch"},
              "hidisc_s0": {"method": {"name": "hidisc"}, "seed": 0, "group": "scratch"}}
    study = validate({"models": models, "pretrain": {"model": {"backbone": "test_resnet"}}}, "study")
    from hsat.report.tables import model_names_for

    names = model_names_for(study)
    assert embedding_models(names, sorted(models)) == ["hidisc_s0", "hsat_s0"]
    assert embedding_models(names, sorted(models), max_models=1) == ["hidisc_s0"]
    rng = np.random.default_rng(0)
    for model in models:
        (tmp_path / model).mkdir()
        save_file({"train_features": rng.normal(size=(4, 8)).astype(np.float32),
                   "val_features": rng.normal(size=(24, 8)).astype(np.float32)}, str(tmp_path / model / "features.safetensors"))
        pd.DataFrame({"patient": [f"p{i % 3}" for i in range(28)], "label": [f"c{i % 2}" for i in range(28)],
                      "split": ["train"] * 4 + ["val"] * 24}).to_csv(tmp_path / model / "index.csv", index=False)
    fig = embedding_map(tmp_path, names=names)
    assert [ax.get_title() for ax in fig.axes] == ["HiDisc s0", "HSAT s0"]
    # A legend of the classes, one of the patients (their markers).
    assert [[t.get_text() for t in legend.get_texts()] for legend in fig.legends] == [["c0", "c1"], ["p0", "p1", "p2"]]


def test_a_method_keeps_its_colour_in_every_figure(whitebox, sanity, study, tmp_path):
    from matplotlib.colors import to_hex

    from hsat.report.figures import robust_accuracy, training_curves
    from hsat.report.style import PALETTE, method_colours
    from hsat.report.tables import model_names_for

    colours = method_colours()
    assert len(set(colours.values())) == len(colours)  # every registered method distinguishable
    assert colours == {k: v for k, v in method_colours(["My variant"]).items() if k != "My variant"}
    assert method_colours(["My variant"])["My variant"] == method_colours(["Other", "My variant"])["My variant"]
    assert colours["HSAT"] in PALETTE and colours["HSAT"] != colours["HSAT-Patch"]

    names = model_names_for(study)
    # robust accuracy: the legend's HSAT entry; its facets read as titles, never "attack = pgd".
    fig = robust_accuracy(whitebox, study, names)
    legend = {t.get_text(): h for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)}
    assert to_hex(legend["HSAT"].get_color()) == colours["HSAT"] and to_hex(legend["HiDisc"].get_color()) == colours["HiDisc"]
    titles = {ax.get_title() for ax in fig.axes} | {t.get_text() for ax in fig.axes for t in ax.texts}
    assert "patch level" in titles and "Worst case" in titles and not any("=" in t for t in titles)
    # sanity checks: hsat_s0's line.
    fig = attack_steps(sanity, names)
    eps = next(ax for ax in fig.axes if ax.get_title().startswith("eps:"))
    assert {to_hex(line.get_color()) for line in eps.get_lines()} == {colours["HSAT"], colours["HiDisc"]}
    # training curves: HSAT seeds share HSAT's colour and differ in line style.
    for model in ("hsat_s0", "hsat_s1", "hidisc_s0"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "log.jsonl").write_text("".join(
            json.dumps({"step": s, "loss_adv_patch": 5 - s / 10 + (s % 3)}) + "\n" for s in range(40)))
    fig = training_curves(tmp_path, names=names)
    ax = fig.axes[0]
    assert ax.get_title() == "adversarial loss, patch level" and ax.get_ylabel() == "loss"
    bold = [line for line in ax.get_lines() if line.get_linewidth() > 1]
    by_colour = {}
    for line in bold:
        by_colour.setdefault(to_hex(line.get_color()), set()).add(line.get_linestyle())
    assert by_colour == {colours["HSAT"]: {"-", "--"}, colours["HiDisc"]: {"-"}}
    smoothed = np.asarray(bold[0].get_ydata())
    assert np.std(np.diff(smoothed)) < np.std(np.diff(np.asarray(ax.get_lines()[0].get_ydata())))


def test_sanity_legend_names_the_models_of_the_sweeps_only(sanity, study):
    from hsat.report.tables import model_names_for

    many = pd.DataFrame([dict(model=m, check="above_clean", param="pgd/feature/knn", value=8, acc=40.0, passed=True,
                              criterion="attacked acc <= clean acc") for m in MODELS])
    fig = attack_steps(pd.concat([sanity, many], ignore_index=True), model_names_for(study))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["HiDisc", "HSAT", "failed"]
    above = next(ax for ax in fig.axes if ax.get_title().startswith("above_clean"))
    assert [t.get_text() for t in above.get_xticklabels()][:2] == ["HiDisc s0", "HiDisc s1"]
    # A check at one value (large_eps_label: eps 64 only) is drawn per model, not on a one-value axis.
    large = next(ax for ax in fig.axes if ax.get_title().startswith("large_eps_label"))
    assert [t.get_text() for t in large.get_xticklabels()] == ["HiDisc s0", "HSAT s0"]
