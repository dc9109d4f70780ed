"""Tables and figures from small hand-made tidy CSVs: shapes, mean ± std over seeds, headline claims."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hsat.config import validate
from hsat.report import collect, read_tidy
from hsat.report.tables import headline, table1, table2, table4, write_tables

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


@pytest.fixture(scope="module")
def study():
    models = {k: {**v, "group": "scratch"} for k, v in MODELS.items()}
    return validate({"models": models, "pretrain": {"model": {"backbone": "test_resnet"}}}, "study")


@pytest.fixture(scope="module")
def whitebox(study) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for model, spec in MODELS.items():
        method = spec["method"]["name"]
        conds = [("none", 0)] + [(a, e) for a in ("pgd", "bim", "mifgsm") for e in (4, 8)]
        for attack, eps in conds:
            for objective in (["none"] if attack == "none" else ["feature", "linear_ce"]):
                for classifier in ("knn", "linear"):
                    for level in ("patch", "slide", "patient"):
                        acc = float(rng.uniform(10, 90))
                        rows.append(dict(model=model, method=method, group="scratch", seed=spec.get("seed", 0),
                                         attack=attack, eps=eps, steps=0 if attack == "none" else 10,
                                         objective=objective, classifier=classifier, level=level,
                                         acc=acc, mca=acc - 1.0, top2=acc, top3=acc, map=acc))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def transfer() -> pd.DataFrame:
    rows = []
    models = ["hidisc_s0", "hsat_s0", "hsat_patch"]
    for i, s in enumerate(models):
        for j, t in enumerate(models):
            if s == t:
                continue
            for level in ("patch", "slide", "patient"):
                rows.append(dict(surrogate=s, target=t, attack="pgd", eps=8, steps=10, objective="feature",
                                 classifier="knn", level=level, acc=50.0, mca=49.0, clean_acc=60.0,
                                 clean_mca=59.0, acc_drop=float(10 * i + j), mca_drop=float(10 * i + j) + 0.5))
    return pd.DataFrame(rows)


def _sel(df, **kw):
    for k, v in kw.items():
        df = df[df[k] == v]
    return df


def test_table1_rows_columns_and_seed_stats(whitebox, study):
    table, caption = table1(whitebox, study)
    # One row per method (seeds pooled), n counts the models.
    assert len(table) == 6
    n = dict(zip(table.index.get_level_values("Method"), table.index.get_level_values("n")))
    assert n["HiDisc"] == 3 and n["HSAT"] == 3 and n["HSAT-Patch"] == 1
    conditions = list(dict.fromkeys(table.columns.get_level_values("Condition")))
    assert conditions == ["Clean", "PGD 4/255", "PGD 8/255", "BIM 4/255", "BIM 8/255", "MI-FGSM 4/255", "MI-FGSM 8/255"]
    assert table.shape[1] == 7 * 2 * 3
    # Primary setting: knn classifier, feature objective (first of the configured lists).
    assert "knn" in caption and "feature" in caption
    expect = _sel(whitebox, method="hsat", attack="pgd", eps=8, classifier="knn", objective="feature", level="patch")["acc"]
    row = table.xs("HSAT", level="Method")
    cell = row[("PGD 8/255", "Acc", "patch")].iloc[0]
    assert cell == f"{expect.mean():.1f} ± {expect.std(ddof=1):.1f}"
    single = table.xs("HSAT-Patch", level="Method")[("Clean", "MCA", "slide")].iloc[0]
    clean = _sel(whitebox, model="hsat_patch", attack="none", classifier="knn", level="slide")["mca"]
    assert single == f"{clean.iloc[0]:.1f}"


def test_table2_matrix_and_average(transfer, study):
    table, _ = table2(transfer, study)
    patch = table.xs("patch", level="Level")
    assert list(patch.index) == ["hidisc_s0", "hsat_s0", "hsat_patch", "Average"]
    # Average over surrogates of the drop on target hsat_patch (surrogates 0 and 1): (2 + 12) / 2.
    assert patch.loc["Average", ("hsat_patch", "Acc-D")] == "7.0"
    assert patch.loc["hidisc_s0", ("hidisc_s0", "Acc-D")] == "–"  # no diagonal in the data
    assert patch.loc["hsat_s0", ("hidisc_s0", "MCA-D")] == "10.5"


def test_table4_orders_ablation_by_max_levels(whitebox, study):
    table, _ = table4(whitebox, study)
    assert list(table.index.get_level_values("L_max levels")) == ["patch", "slide + patch", "patient + slide + patch"]
    assert set(table.index.get_level_values("L_min levels")) == {"patient + slide + patch"}


def test_write_tables_and_headline_match_hand_computation(whitebox, transfer, study, tmp_path):
    paths = write_tables(whitebox, transfer, study, tmp_path)
    for i in range(1, 5):
        for ext in ("csv", "md", "tex"):
            assert (tmp_path / f"table{i}.{ext}").stat().st_size > 0
    assert len(paths) == 12
    t1 = pd.read_csv(tmp_path / "table1.csv")
    assert {"Group", "Method", "Backbone", "n", "PGD 8/255 Acc patch"} <= set(t1.columns)
    assert set(t1["Backbone"]) == {"test_resnet"}
    assert "\\begin{table}" in (tmp_path / "table1.tex").read_text()
    t3 = pd.read_csv(tmp_path / "table3.csv")
    assert list(t3["Method"]) == ["HSAT-Patient", "HSAT-Patch", "HSAT-Slide"] or set(t3["Method"]) == {"HSAT-Patch", "HSAT-Slide", "HSAT-Patient"}

    h = headline(whitebox, study)["groups"]["scratch:test_resnet"]
    pick = dict(attack="pgd", eps=8, classifier="knn", objective="feature", level="patch")
    hsat = _sel(whitebox, method="hsat", **pick)["acc"]
    base = _sel(whitebox, method="hidisc", **pick)["acc"]
    assert h["hsat_pgd_acc"]["n"] == 3
    assert h["hsat_pgd_acc"]["std"] == pytest.approx(hsat.std(ddof=1))
    assert h["hsat_minus_baseline_pgd_acc"] == pytest.approx(hsat.mean() - base.mean())
    assert h["claim_robust_gain_holds"] == bool(hsat.mean() - base.mean() >= 15)
    clean = dict(attack="none", classifier="knn", level="patch")
    diff = _sel(whitebox, method="hsat", **clean)["acc"].mean() - _sel(whitebox, method="hsat_patch", **clean)["acc"].mean()
    assert h["hsat_minus_hsat_patch_clean_acc"] == pytest.approx(diff)
    assert h["claim_clean_gain_holds"] == bool(diff > 0)
    json.dumps(headline(whitebox, study))  # JSON-serialisable (no NaN objects)


def test_collect_skips_empty_inputs(whitebox, tmp_path):
    a, b, empty = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "e.csv"
    whitebox.iloc[:5].to_csv(a, index=False)
    whitebox.iloc[5:9].to_csv(b, index=False)
    empty.write_text("")
    out = collect([a, empty, b], tmp_path / "all.csv")
    assert len(out) == 9 and len(read_tidy(tmp_path / "all.csv")) == 9


def test_cli_tables_and_figures(whitebox, transfer, study, tmp_path):
    from safetensors.numpy import save_file

    from hsat.cli import main
    from hsat.io import write_yaml

    cfg = tmp_path / "study.yaml"
    write_yaml(cfg, study)
    wb, tr, sa = tmp_path / "wb.csv", tmp_path / "tr.csv", tmp_path / "sa.csv"
    whitebox.to_csv(wb, index=False)
    transfer.to_csv(tr, index=False)
    pd.DataFrame({"model": ["hsat_s0"] * 4, "check": ["steps", "steps", "eps", "eps"], "param": ["steps", "steps", "eps", "eps"],
                  "value": [1, 10, 8, 64], "acc": [50.0, 40.0, 40.0, 0.0], "passed": [True, True, True, False]}).to_csv(sa, index=False)
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
    figs = tmp_path / "figures"
    assert main(["report", "figures", "--config", str(cfg), "--whitebox", str(wb), "--transfer", str(tr), "--sanity", str(sa),
                 "--runs-dir", str(runs), "--embeddings-dir", str(tmp_path / "emb"), "--out-dir", str(figs)]) == 0
    from hsat.report.figures import FIGURES

    for name in FIGURES:
        assert (figs / f"{name}.png").stat().st_size > 1000
        assert (figs / f"{name}.pdf").stat().st_size > 1000
