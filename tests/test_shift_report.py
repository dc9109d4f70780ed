"""Natural shifts in the report: Table 6, the natural-shift figure, the carry-over claims, the
robustness cards (their numbers are the result files' rows), and config/foundation.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from hsat.config import validate
from hsat.report.claims import HOLDS, UNJUDGED, claims
from hsat.report.tables import table6, write_tables

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("channel_gain", "jpeg", "adversarial_stain")
LEVELS = ("patch", "slide", "patient")
# Patch-level kNN accuracy per model: clean, then what each family takes off per severity.
MODELS = {
    "hidisc_s0": ("hidisc", 0, 80.0, 12.0), "hidisc_s1": ("hidisc", 1, 81.0, 12.5), "hidisc_s2": ("hidisc", 2, 82.0, 11.5),
    "hsat_s0": ("hsat", 0, 70.0, 4.0), "hsat_s1": ("hsat", 1, 71.0, 4.5), "hsat_s2": ("hsat", 2, 69.0, 3.5),
    "dino_s0": ("dino", 0, 75.0, 8.0), "robust_dino_s0": ("robust_dino", 0, 65.0, 3.0),
}


@pytest.fixture(scope="module")
def study():
    models = {m: {"method": {"name": method}, "seed": seed, "group": "scratch"} for m, (method, seed, _, _) in MODELS.items()}
    return validate({"models": models, "pretrain": {"model": {"backbone": "test_resnet"}},
                     "evaluation": {"max_val_patches": None, "whitebox": {"classifiers": ["knn", "linear"]}}}, "study")


def _row(model, attack, severity, classifier, level, acc, key="severity"):
    method, seed, _, _ = MODELS[model]
    return {"model": model, "method": method, "group": "scratch", "seed": seed, "attack": attack, key: severity,
            "steps": 0, "objective": "none", "classifier": classifier, "level": level, "acc": acc, "mca": acc - 1,
            "top2": acc, "top3": acc, "map": float("nan")}


def shift_frame(models=MODELS, severities=(0, 1, 3)):
    """Rows as `hsat shift` writes them; the linear classifier 5 points below kNN, each level 1 above the last."""
    rows = []
    for model, (_, _, clean, step) in models.items():
        for clf, off in (("knn", 0.0), ("linear", -5.0)):
            for li, level in enumerate(LEVELS):
                c = clean + off + li
                rows.append(_row(model, "none", 0, clf, level, c))
                for fi, family in enumerate(FAMILIES):
                    for s in severities:
                        rows.append(_row(model, family, s, clf, level, c - step * s * (1 + fi)))
                for s in [s for s in severities if s]:
                    rows.append(_row(model, "worst_case", s, clf, level, c - step * s * (len(FAMILIES) + 1)))
    return pd.DataFrame(rows)


def whitebox_frame():
    rows = []
    for model, (_, _, clean, step) in MODELS.items():
        for clf, off in (("knn", 0.0), ("linear", -5.0)):
            for li, level in enumerate(LEVELS):
                c = clean + off + li
                rows.append({**_row(model, "none", 0.0, clf, level, c, key="eps"), "objective": "feature"})
                rows.append({**_row(model, "none", 0.0, clf, level, c, key="eps"), "objective": "head"})
                for eps in (4.0, 8.0):
                    rows.append({**_row(model, "pgd", eps, clf, level, c - 2 * eps, key="eps"), "objective": "feature"})
                    rows.append({**_row(model, "worst_case", eps, clf, level, c - 3 * eps - step, key="eps"),
                                 "objective": "all"})
    return pd.DataFrame(rows)


def transfer_frame():
    rows = []
    for s, t, drop in (("hidisc_s0", "hsat_s0", 2.0), ("hidisc_s1", "hsat_s0", 4.0), ("hsat_s1", "hsat_s0", 3.0),
                       ("hsat_s0", "hidisc_s0", 20.0)):
        for level in LEVELS:
            rows.append({"surrogate": s, "target": t, "attack": "pgd", "eps": 8.0, "steps": 10, "objective": "feature",
                         "classifier": "knn", "level": level, "acc": 50.0, "clean_acc": 50.0 + drop,
                         "acc_drop": drop + LEVELS.index(level), "mca_drop": drop})
    return pd.DataFrame(rows)


def test_table6_shows_each_family_at_the_largest_severity_and_the_worst_case(study, tmp_path):
    table, caption = table6(shift_frame(), study)
    assert "severity 3" in caption and "knn classifier" in caption
    hsat = table.xs("HSAT", level="Method")
    # mean +- sd over the three HSAT seeds: clean 70, 71, 69 -> 70.0 +- 1.0; JPEG at 3: minus 2 x 3 x step
    assert hsat[("patch", "Clean")].iloc[0] == "70.0 ± 1.0"
    jpeg = [70.0 - 2 * 3 * 4.0, 71.0 - 2 * 3 * 4.5, 69.0 - 2 * 3 * 3.5]
    assert hsat[("patch", "JPEG")].iloc[0] == f"{pd.Series(jpeg).mean():.1f} ± {pd.Series(jpeg).std():.1f}"
    assert ("patient", "Worst case") in table.columns and ("slide", "Adversarial stain") in table.columns
    assert table.xs("Robust DINO", level="Method").index.get_level_values("n")[0] == 1
    # write_tables writes it with the others; without shift rows, a note
    paths = write_tables(whitebox_frame(), pd.DataFrame(), study, tmp_path / "t", shift=shift_frame())
    assert {p.name for p in paths} >= {"table6.csv", "table6.md", "table6.tex"}
    long = pd.read_csv(tmp_path / "t" / "table6.csv")
    assert {"classifier", "attack", "severity", "level", "acc_mean", "mca_mean"} <= set(long.columns)
    assert set(long["classifier"]) == {"knn", "linear"}
    assert "\\begin{table}" in (tmp_path / "t" / "table6.tex").read_text()
    # shift.csv without rows: a note; no shift.csv at all (the sweep is off): no Table 6
    write_tables(whitebox_frame(), pd.DataFrame(), study, tmp_path / "e", shift=pd.DataFrame())
    assert "no matching results" in (tmp_path / "e" / "table6.md").read_text()
    paths = write_tables(whitebox_frame(), pd.DataFrame(), study, tmp_path / "off")
    assert not [p for p in paths if p.name.startswith("table6")] and not (tmp_path / "off" / "table6.md").exists()


def test_natural_shift_figure_draws_the_families_or_says_there_is_no_data(study, tmp_path):
    from hsat.report.figures import FIGURES, natural_shift, save_figure

    assert "natural_shift" in FIGURES
    fig = natural_shift(shift_frame(), study)
    titles = {ax.get_title() for ax in fig.axes}
    assert {"Channel gain", "JPEG", "Adversarial stain", "Worst case"} <= titles
    paths = save_figure(fig, tmp_path, "natural_shift")
    assert all(p.stat().st_size > 0 for p in paths)
    empty = natural_shift(pd.DataFrame(), study)
    assert "no natural-shift results" in " ".join(t.get_text() for ax in empty.axes for t in ax.texts)


def test_carry_over_claims_judge_robust_against_plain_on_the_shift_worst_case(study):
    found = [c for c in claims(whitebox_frame(), None, None, study, shift=shift_frame()) if c["id"].startswith("shift_")]
    by_id = {c["id"]: c for c in found}
    assert set(by_id) == {"shift_hsat", "shift_robust_dino"}  # no HLSS or reference models: no such pairs
    hsat = by_id["shift_hsat"]
    # HSAT: 70 - 3*4*4 = 22 (mean over seeds); HiDisc: 81 - 3*4*12 = -63 ... percentages need not be sane here
    wc = lambda clean, step: clean - step * 3 * (len(FAMILIES) + 1)  # noqa: E731
    assert hsat["numbers"]["means"]["hsat"] == pytest.approx(sum(wc(MODELS[m][2], MODELS[m][3]) for m in ("hsat_s0", "hsat_s1", "hsat_s2")) / 3)
    assert hsat["numbers"]["severity"] == 3 and hsat["numbers"]["classifier"] == "knn"
    assert hsat["verdict"] == HOLDS, hsat["reason"]
    assert set(hsat["numbers"]["families"]) == set(FAMILIES)
    jpeg = hsat["numbers"]["families"]["jpeg"]
    assert jpeg["gap"] > 0 and jpeg["p_value"] is not None
    assert hsat["numbers"]["clean"] == {"hsat": pytest.approx(70.0), "hidisc": pytest.approx(81.0)}
    # one seed of each DINO: cannot be judged
    assert by_id["shift_robust_dino"]["verdict"] == UNJUDGED and "fewer than 3" in by_id["shift_robust_dino"]["reason"]
    # without shift.csv no such claim
    assert not [c for c in claims(whitebox_frame(), None, None, study) if c["id"].startswith("shift_")]


def test_robustness_card_numbers_are_the_result_files_rows(study, tmp_path):
    from hsat.report.card import robustness_card, write_card

    wb, sh, tr = whitebox_frame(), shift_frame(), transfer_frame()
    card = robustness_card("hsat_s0", study, wb, sh, tr)
    assert card["classifier"] == "knn" and card["method"] == "hsat" and card["seed"] == 0 and card["group"] == "scratch"
    for level in LEVELS:
        entry = card["levels"][level]
        rows = wb[(wb["model"] == "hsat_s0") & (wb["classifier"] == "knn") & (wb["level"] == level)]
        assert entry["clean_acc"] == rows.loc[rows["attack"] == "none", "acc"].iloc[0]
        for eps in ("4", "8"):
            assert entry["linf_worst_case_acc"][eps] == rows.loc[(rows["attack"] == "worst_case") & (rows["eps"] == float(eps)), "acc"].iloc[0]
        srows = sh[(sh["model"] == "hsat_s0") & (sh["classifier"] == "knn") & (sh["level"] == level)]
        for family in FAMILIES:
            for sev, acc in entry["shift_acc"][family].items():
                assert acc == srows.loc[(srows["attack"] == family) & (srows["severity"] == int(sev)), "acc"].iloc[0]
        assert set(entry["shift_worst_case_acc"]) == {"1", "3"}
        assert entry["shift_worst_case_acc"]["3"] == srows.loc[(srows["attack"] == "worst_case") & (srows["severity"] == 3), "acc"].iloc[0]
        # the mean over its three surrogates' drops at this level
        trows = tr[(tr["target"] == "hsat_s0") & (tr["level"] == level)]
        assert entry["transfer_acc_drop"] == pytest.approx(trows["acc_drop"].mean())
        assert entry["transfer_surrogates"] == ["hidisc_s0", "hidisc_s1", "hsat_s1"]
    # a model that is no target and has no shift rows: None and empty, not an error
    other = robustness_card("dino_s0", study, wb, None, tr)
    assert other["levels"]["patch"]["transfer_acc_drop"] is None and other["levels"]["patch"]["shift_acc"] == {}
    paths = write_card(card, tmp_path / "cards")
    assert [p.name for p in paths] == ["hsat_s0.json", "hsat_s0.png", "hsat_s0.pdf"]
    assert json.loads(paths[0].read_text())["levels"]["patch"]["clean_acc"] == card["levels"]["patch"]["clean_acc"]


def test_cli_card_writes_json_and_figure_and_refuses_an_unknown_model(study, tmp_path):
    import yaml

    from hsat.cli import main

    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(json.loads(json.dumps(study))))
    for name, frame in (("whitebox", whitebox_frame()), ("shift", shift_frame()), ("transfer", transfer_frame())):
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
    common = ["report", "card", "--study", str(cfg), "--whitebox", str(tmp_path / "whitebox.csv"),
              "--shift", str(tmp_path / "shift.csv"), "--transfer", str(tmp_path / "transfer.csv"),
              "--out-dir", str(tmp_path / "cards")]
    assert main([*common, "--model", "hidisc_s1", "hsat_s2"]) == 0
    card = json.loads((tmp_path / "cards" / "hidisc_s1.json").read_text())
    assert card["levels"]["slide"]["clean_acc"] == 82.0 and (tmp_path / "cards" / "hidisc_s1.png").is_file()
    assert (tmp_path / "cards" / "hsat_s2.pdf").is_file()
    # an unknown model among them: exit 2, no card written (every card is built before any is written)
    assert main([*common, "--out-dir", str(tmp_path / "bad"), "--model", "hsat_s0", "nope"]) == 2
    assert not (tmp_path / "bad").exists()


def test_foundation_overlay_validates_as_a_gpu_vit_l_encoder():
    from hsat.config import resolve_study, run_config_for_model

    study, _ = resolve_study(REPO / "config" / "config.yaml", [REPO / "config" / "foundation.yaml"])
    imported = [m for m, spec in study["models"].items() if spec["method"]["name"] == "pretrained"]
    assert imported, "config/foundation.yaml names no pretrained encoder"
    run = run_config_for_model(study, imported[0])
    assert run["model"]["backbone"] == "vit_large_patch16_224" and run["data"]["image_size"] == 224
    assert run["model"]["pretrained_path"] and len(run["model"]["mean"]) == 3 and len(run["model"]["std"]) == 3
    assert run["device"] == "cuda"
    assert study["evaluation"]["shift"]["enabled"]
