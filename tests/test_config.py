"""Config is data: schema validation, defaults, overrides and method variants."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from hsat.config import (
    apply_overlay,
    deep_merge,
    leaf_paths,
    load_run_config,
    load_study_config,
    parse_overrides,
    resolve_study,
    run_config_for_model,
    show_study,
    validate,
)
from hsat.errors import HSATError
from hsat.methods import VARIANTS, resolve_method


def test_defaults_fill_nested_sections():
    cfg = load_run_config()
    assert cfg["attack"]["eps"] == 8 and cfg["attack"]["alpha"] == 2 and cfg["attack"]["steps"] == 3  # the default study
    assert cfg["method"]["name"] == "hsat"
    assert cfg["method"]["min_levels"] == ["patient", "slide", "patch"]


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["train.steps=7", "model.head_hidden=[64, 32]", "method.name=hidisc"]) == {
        "train": {"steps": 7},
        "model": {"head_hidden": [64, 32]},
        "method": {"name": "hidisc"},
    }
    cfg = load_run_config(overrides=["train.steps=7", "method.name=hidisc"])
    assert cfg["train"]["steps"] == 7 and cfg["method"]["adversarial"] is False


@pytest.mark.parametrize("bad", ["train.steps", "=3"])
def test_malformed_override_is_named(bad):
    with pytest.raises(HSATError, match="override"):
        parse_overrides([bad])


def test_errors_name_every_bad_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"stepz": 3}, "attack": {"eps": -1}}))
    with pytest.raises(HSATError) as info:
        load_run_config(path)
    msg = str(info.value)
    assert str(path) in msg and "train" in msg and "stepz" in msg and "attack.eps" in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(HSATError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(HSATError, match="not valid YAML"):
        load_run_config(bad)


def test_unknown_method_needs_explicit_levels():
    with pytest.raises(HSATError, match="not a known variant"):
        resolve_method({"name": "mystery"})
    custom = resolve_method({"name": "mine", "adversarial": True, "min_levels": ["patch", "slide"], "max_levels": ["patch"]})
    assert custom["min_levels"] == ["slide", "patch"]  # canonical order


def test_variants_differ_only_by_levels():
    assert set(VARIANTS) >= {"hidisc", "hsat", "hsat_patch", "hsat_slide", "hsat_lmax_patch", "hsat_lmax_patch_slide"}
    for spec in VARIANTS.values():
        assert set(spec) == {"adversarial", "min_levels", "max_levels"}


def test_study_model_inherits_pretrain_and_overrides(tmp_path):
    study = {
        "pretrain": {"train": {"steps": 11}, "method": {"temperature": 0.1}},
        "models": {
            "base": {"method": {"name": "hidisc"}, "group": "scratch"},
            "adv": {"method": {"name": "hsat"}, "seed": 3, "attack": {"steps": 2}},
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    s = load_study_config(path)
    base = run_config_for_model(s, "base", manifest="m.csv")
    adv = run_config_for_model(s, "adv")
    assert base["train"]["steps"] == adv["train"]["steps"] == 11
    assert base["method"]["temperature"] == 0.1  # a model's method section does not reset inherited keys
    assert base["data"]["manifest"] == "m.csv" and "group" not in base
    assert adv["seed"] == 3 and adv["attack"]["steps"] == 2 and adv["method"]["adversarial"]
    with pytest.raises(HSATError, match="not in the study"):
        run_config_for_model(s, "missing")


def test_study_requires_models():
    with pytest.raises(HSATError, match="models"):
        validate({}, "study")


def test_deep_merge_does_not_mutate():
    a = {"x": {"y": 1, "z": 2}}
    b = {"x": {"y": 3}}
    assert deep_merge(a, b) == {"x": {"y": 3, "z": 2}} and a == {"x": {"y": 1, "z": 2}}


# ----------------------------------------------------------------------------- overlays

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "config" / "config.yaml"


def _get(d, path):
    for key in path:
        d = d[key]
    return d


def test_opensrh_overlay_is_the_paper_config_it_always_was():
    """config/opensrh.yaml read alone and as an overlay on the default study give the same study
    (every model's run config, the evaluation, the tables): it names all its differences."""
    from hsat.config import read_yaml, run_config_for_model

    path = ROOT / "config" / "opensrh.yaml"
    alone = validate(read_yaml(path), "study", source=str(path))
    overlaid, named = resolve_study(BASE, [path])
    assert overlaid["evaluation"] == alone["evaluation"]
    assert overlaid["tables"] == alone["tables"] and list(overlaid["models"]) == list(alone["models"])
    for model in alone["models"]:
        assert run_config_for_model(overlaid, model) == run_config_for_model(alone, model), model
    assert ("pretrain", "augment", "strength") in named


def test_overlay_keeps_the_default_study_and_follows_its_models(tmp_path):
    overlay = tmp_path / "mine.yaml"
    overlay.write_text(
        "models:\n  hidisc_s0: {method: {name: hidisc}, seed: 0}\n  hsat_s0: {method: {name: hsat}, seed: 0}\n"
        "pretrain: {train: {steps: 50}}\n"
    )
    default, _ = resolve_study(BASE)
    cfg, named = resolve_study(BASE, [overlay])
    assert list(cfg["models"]) == ["hidisc_s0", "hsat_s0"]  # models replace the matrix
    assert cfg["pretrain"]["train"]["steps"] == 50
    assert cfg["pretrain"]["optim"] == default["pretrain"]["optim"]  # the rest is the default study's
    assert run_config_for_model(cfg, "hsat_s0")["optim"]["lr"] == run_config_for_model(default, "hsat_s0")["optim"]["lr"]
    assert cfg["evaluation"]["whitebox"]["steps"] == default["evaluation"]["whitebox"]["steps"]
    for path in (("evaluation", "transfer", "models"), ("evaluation", "sanity", "models")):
        assert _get(cfg, path) == [m for m in _get(default, path) if m in cfg["models"]]
    assert ("pretrain", "train", "steps") in named and ("pretrain", "optim", "lr") not in named
    text = show_study(cfg, named)
    assert "steps: 50  # overlay" in text and "lr: 0.003  # overlay" not in text


def test_overlay_naming_a_list_keeps_it_and_unknown_keys_are_named(tmp_path):
    cfg = apply_overlay({"models": {"a": {}, "b": {}}, "evaluation": {"sanity": {"models": ["a"]}}},
                        {"models": {"b": {}, "c": {}}, "evaluation": {"transfer": {"models": ["c"]}}})
    assert cfg["evaluation"]["sanity"]["models"] == []  # followed: a is gone
    assert cfg["evaluation"]["transfer"]["models"] == ["c"]  # named by the overlay
    vit = {"models": {"a": {}, "v": {}}, "evaluation": {"attention": {"models": ["v"]}}}
    assert apply_overlay(vit, {"models": {"a": {}}})["evaluation"]["attention"]["models"] == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluation: {whitebox: {epsilon: [8]}}\n")
    with pytest.raises(HSATError, match="epsilon"):
        resolve_study(BASE, [bad])
    assert leaf_paths({"models": {"m": {"seed": 1}}, "a": {"b": 1}}) == {("models", "m"), ("a", "b")}


def test_an_override_of_one_model_key_keeps_the_other_models():
    default, _ = resolve_study(BASE)
    cfg, named = resolve_study(BASE, overrides=["models.hsat_s0.seed=5"])
    assert set(cfg["models"]) == set(default["models"])
    assert cfg["models"]["hsat_s0"]["seed"] == 5
    assert cfg["models"]["hsat_s0"]["method"] == default["models"]["hsat_s0"]["method"]
    assert ("models", "hsat_s0") in named


@pytest.mark.parametrize("models", ["[hsat_s0]", "hsat_s0"])
def test_an_overlay_whose_models_is_not_a_mapping_is_named(tmp_path, capsys, models):
    from hsat.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"models: {models}\n")
    with pytest.raises(HSATError, match=r"bad\.yaml: models must map"):
        resolve_study(BASE, [bad])
    assert main(["config", "show", "--base", str(BASE), "--configfile", str(bad)]) == 2
    assert "bad.yaml: models must map" in capsys.readouterr().err


def test_cli_config_show_marks_overlay_values(tmp_path, capsys):
    from hsat.cli import main

    overlay = tmp_path / "mine.yaml"
    overlay.write_text("evaluation: {knn: {k: 7}}\n")
    assert main(["config", "show", "--base", str(BASE), "--configfile", str(overlay)]) == 0
    out = capsys.readouterr().out
    assert "k: 7  # overlay" in out and "models:" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain_typo: {}\n")
    assert main(["config", "show", "--base", str(BASE), "--configfile", str(bad)]) == 2
    assert "pretrain_typo" in capsys.readouterr().err


def test_defaults_live_in_the_schema_alone():
    """config/config.yaml names the study matrix and its model lists, nothing else: every other
    value of the default study is the schema's default, so the two cannot disagree."""
    from hsat.config import MODEL_LISTS, read_yaml

    named = leaf_paths(read_yaml(BASE))
    allowed = {p for p in named if p[0] == "models"} | set(MODEL_LISTS)
    assert named <= allowed, sorted(named - allowed)
    default, _ = resolve_study(BASE)
    assert run_config_for_model(default, "hsat_s0") == run_config_for_model(
        validate({"models": {"x": {"method": {"name": "hsat"}}}}, "study"), "x")


def test_core_overlay_is_the_default_study_restricted_to_the_papers_design():
    """config/core.yaml trains exactly the default study's HiDisc/HSAT models and the references (same run configs, so
    the same numbers) and keeps every evaluation list of the default study that still applies."""
    path = ROOT / "config" / "core.yaml"
    default, _ = resolve_study(BASE)
    core, _ = resolve_study(BASE, [path])
    assert core["models"] and set(core["models"]) < set(default["models"])
    assert {core["models"][m]["method"]["name"] for m in core["models"]} <= {
        "hidisc", "hsat", "hsat_patch", "hsat_slide", "hsat_lmax_patch", "hsat_lmax_patch_slide",
        "supervised", "supervised_at"}
    for model in core["models"]:
        assert run_config_for_model(core, model) == run_config_for_model(default, model), model
    for key in ("transfer", "sanity"):
        assert core["evaluation"][key]["models"] == [m for m in default["evaluation"][key]["models"] if m in core["models"]]
    aa = core["evaluation"]["whitebox"]["autoattack"]["models"]
    assert aa == [m for m in default["evaluation"]["whitebox"]["autoattack"]["models"] if m in core["models"]]
    assert not aa or set(core["models"]) <= set(aa)  # AutoAttack on every model (an empty list names them all)
    assert {k: v for k, v in core["evaluation"].items() if k not in {"transfer", "sanity", "whitebox", "attention"}} == {
        k: v for k, v in default["evaluation"].items() if k not in {"transfer", "sanity", "whitebox", "attention"}}


def test_default_study_runs_autoattack_on_every_model():
    """Every claim compares worst cases, so every model of the default study takes the same attacks, AutoAttack
    included (an empty list names every model; a model left off would get a weaker worst case)."""
    default, _ = resolve_study(BASE)
    assert "autoattack" in default["evaluation"]["whitebox"]["attacks"]
    aa = default["evaluation"]["whitebox"]["autoattack"]["models"]
    assert not aa or set(default["models"]) <= set(aa)


def test_ablations_overlay_adds_seeds_to_the_papers_study_and_reuses_its_models():
    """config/ablations.yaml is config/core.yaml plus three seeds of each HSAT ablation (seed 0 and the "clean
    samples also" run are the default study's): every model of `make study` and of the default study keeps its
    run config and its place on the evaluation lists (so its jobs are not rerun), and the new seeds get
    AutoAttack like seed 0 (their worst case takes the same attacks)."""
    default, _ = resolve_study(BASE)
    core, _ = resolve_study(BASE, [ROOT / "config" / "core.yaml"])
    abl, _ = resolve_study(BASE, [ROOT / "config" / "ablations.yaml"])
    assert set(core["models"]) < set(abl["models"])
    for model in core["models"]:
        assert run_config_for_model(abl, model) == run_config_for_model(core, model), model
    for model in set(abl["models"]) & set(default["models"]):
        assert run_config_for_model(abl, model) == run_config_for_model(default, model), model
    new = sorted(set(abl["models"]) - set(core["models"]) - {"hsat_clean_adv"})
    ablations = {"hsat_patch", "hsat_slide", "hsat_lmax_patch", "hsat_lmax_patch_slide"}
    assert sorted((abl["models"][m]["method"]["name"], abl["models"][m]["seed"]) for m in new) == sorted(
        (a, s) for a in ablations for s in (0, 1, 2))
    for model in new:
        seed0 = next(m for m in default["models"] if default["models"][m]["method"]["name"] == abl["models"][model]["method"]["name"])
        assert {k: v for k, v in run_config_for_model(abl, model).items() if k != "seed"} == {
            k: v for k, v in run_config_for_model(default, seed0).items() if k != "seed"}, model
    aa = abl["evaluation"]["whitebox"]["autoattack"]["models"]
    assert not aa or set(abl["models"]) <= set(aa)
    assert abl["results_dir"] == core["results_dir"]
    for key in ("transfer", "sanity"):
        assert abl["evaluation"][key]["models"] == core["evaluation"][key]["models"]


def test_dino_levels_overlay_reuses_the_default_studys_models_and_varies_only_positives():
    """config/dino_levels.yaml: its HSAT and robust DINO models are the default study's (same run configs, so their
    jobs are reused), and the two new models differ from robust DINO seed 0 only in method.dino.positives."""
    default, _ = resolve_study(BASE)
    levels, _ = resolve_study(BASE, [ROOT / "config" / "dino_levels.yaml"])
    new = {"robust_dino_vit_slide_s0": "slide", "robust_dino_vit_patient_s0": "patient"}
    assert set(levels["models"]) - set(default["models"]) == set(new)
    for model in set(levels["models"]) - set(new):
        assert run_config_for_model(levels, model) == run_config_for_model(default, model), model
    base = run_config_for_model(default, "robust_dino_vit_s0")
    for model, positives in new.items():
        run = copy.deepcopy(run_config_for_model(levels, model))
        assert run["method"]["dino"]["positives"] == positives
        run["method"]["dino"]["positives"] = base["method"]["dino"]["positives"]
        assert run == base, model
    aa = levels["evaluation"]["whitebox"]["autoattack"]["models"]
    assert not aa or set(levels["models"]) <= set(aa)


def test_config_show_marks_exactly_the_keys_an_overlay_sets(tmp_path, capsys):
    from hsat.cli import main

    overlay = tmp_path / "mine.yaml"
    overlay.write_text("models:\n  m: {method: {name: hsat}, seed: 1}\npretrain: {augment: {preset: he}}\n")
    assert main(["config", "show", "--base", str(BASE), "--study", str(overlay)]) == 0
    marked = [line.strip() for line in capsys.readouterr().out.splitlines()[1:] if line.endswith("# overlay")]
    # the model's entry and the three values named; not the method defaults filled in beside them
    assert marked == ["m:  # overlay", "name: hsat  # overlay", "seed: 1  # overlay", "preset: he  # overlay"]
    # --configfile, snakemake's name, is the same option
    assert main(["config", "show", "--base", str(BASE), "--configfile", str(overlay)]) == 0
    assert capsys.readouterr().out.count("# overlay") == 5


def test_config_show_finds_the_default_study_outside_the_workflow_folder(tmp_path, monkeypatch, capsys):
    import hsat.config as config_module
    from hsat.cli import main
    from hsat.config import find_default_study

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("evaluation: {knn: {k: 7}}\n")
    assert main(["config", "show", "--study", "mine.yaml"]) == 0  # the checkout hsat is imported from
    out = capsys.readouterr().out
    assert out.startswith(f"# {BASE.resolve()} + mine.yaml") and "k: 7  # overlay" in out
    workflow = tmp_path / "wf"
    (workflow / "config").mkdir(parents=True)
    (workflow / "Snakefile").write_text("")
    (workflow / "config" / "config.yaml").write_text(BASE.read_text())
    (workflow / "results" / "x").mkdir(parents=True)
    assert find_default_study(workflow / "results" / "x") == (workflow / "config" / "config.yaml").resolve()
    monkeypatch.setattr(config_module, "__file__", str(tmp_path / "site" / "hsat" / "config.py"))
    with pytest.raises(HSATError, match=r"config/config\.yaml is not in .* give --base"):
        find_default_study(tmp_path)
    assert main(["config", "show", "--study", "mine.yaml"]) == 2
    assert "--base" in capsys.readouterr().err
