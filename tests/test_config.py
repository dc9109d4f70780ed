"""Config is data: schema validation, defaults, overrides and method variants."""

from __future__ import annotations

import pytest
import yaml

from hsat.config import (
    deep_merge,
    load_run_config,
    load_study_config,
    parse_overrides,
    run_config_for_model,
    validate,
)
from hsat.errors import HSATError
from hsat.methods import VARIANTS, resolve_method


def test_defaults_fill_nested_sections():
    cfg = load_run_config()
    assert cfg["attack"]["eps"] == 8 and cfg["attack"]["alpha"] == 2 and cfg["attack"]["steps"] == 5
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
