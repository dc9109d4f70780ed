"""Encoders the study did not train: a run directory made from a saved timm model's weights, or
from the user's own factory, gives the saved model's features; bad files and factories are
refused with exit status 2, naming the file or the key, and nothing is written."""

from __future__ import annotations

import re
import socket
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from hsat.cli import main
from hsat.encoders import import_encoder
from hsat.errors import HSATError
from hsat.io import write_yaml
from hsat.models import load_trained_model
from hsat.train import pretrain

FACTORY_MODULE = "hsat_test_user_encoder"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing is downloaded: any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _run_config(path: Path, model: dict, image_size: int = 16) -> Path:
    write_yaml(path, {"device": "cpu", "method": {"name": "pretrained"}, "data": {"image_size": image_size},
                      "model": {"head_hidden": [8], "embed_dim": 4, **model}})
    return path


@pytest.mark.parametrize("fold_bn", [False, True])
def test_imported_timm_cnn_gives_the_saved_models_pooled_features(tmp_path, fold_bn):
    torch.manual_seed(3)
    saved = timm.create_model("test_resnet").eval()  # with its classifier, as released weights are
    weights = _save(saved, tmp_path / "cnn.safetensors")
    cfg = _run_config(tmp_path / "run.yaml", {"backbone": "test_resnet", "pretrained_path": str(weights)})
    assert main(["pretrain", "--run-config", str(cfg), "--out", str(tmp_path / "run")]) == 0

    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["code.version", "config.yaml", "model.safetensors"]
    model = load_trained_model(tmp_path / "run", fold_bn=fold_bn)
    x = torch.rand(5, 3, 16, 16)
    mean = torch.tensor(saved.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(saved.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = saved.forward_head(saved.forward_features((x - mean) / std), pre_logits=True)
        got = model.encode(x)
    assert got.shape == (5, saved.num_features)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_imported_vit_gives_the_cls_token_under_its_own_normalisation(tmp_path):
    torch.manual_seed(4)
    saved = timm.create_model("test_vit", img_size=16, patch_size=4).eval()
    weights = _save(saved, tmp_path / "vit.safetensors")
    cfg = {"method": {"name": "pretrained"}, "data": {"image_size": 16},
           "model": {"backbone": "test_vit", "pretrained_path": str(weights), "backbone_args": {"patch_size": 4},
                     "mean": [0.7, 0.6, 0.5], "std": [0.2, 0.25, 0.3]}}
    out = import_encoder(cfg, tmp_path / "run")

    model = load_trained_model(out)
    x = torch.rand(3, 3, 16, 16)
    norm = (x - torch.tensor([0.7, 0.6, 0.5]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = saved.forward_head(saved.forward_features(norm), pre_logits=True)  # the CLS token
        got = model.encode(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    written = (out / "config.yaml").read_text(encoding="utf-8")
    assert "name: pretrained" in written and "- 0.7" in written and "- 0.25" in written


def test_the_architectures_own_normalisation_is_written_into_the_run(tmp_path):
    torch.manual_seed(0)
    weights = _save(timm.create_model("test_resnet"), tmp_path / "w.safetensors")
    out = import_encoder({"method": {"name": "pretrained"},
                          "model": {"backbone": "test_resnet", "pretrained_path": str(weights)}}, tmp_path / "run")
    from hsat.config import read_yaml

    model_cfg = read_yaml(out / "config.yaml")["model"]
    assert model_cfg["mean"] == list(timm.create_model("test_resnet").pretrained_cfg["mean"])
    assert model_cfg["std"] == list(timm.create_model("test_resnet").pretrained_cfg["std"])


def test_missing_weights_file_exits_2_naming_it_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "no" / "such.safetensors"
    cfg = _run_config(tmp_path / "run.yaml", {"backbone": "test_resnet", "pretrained_path": str(missing)})
    assert main(["pretrain", "--run-config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_weights_of_another_architecture_exit_2_naming_the_file(tmp_path, capsys):
    wrong = _save(timm.create_model("test_vit"), tmp_path / "vit_weights.safetensors")
    cfg = _run_config(tmp_path / "run.yaml", {"backbone": "test_resnet", "pretrained_path": str(wrong)})
    assert main(["pretrain", "--run-config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(wrong) in err and "missing keys" in err
    assert not (tmp_path / "run").exists()


def test_pickled_code_is_never_run(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "obj": Path("x")}, evil)  # an arbitrary class: unpickling refused
    cfg = _run_config(tmp_path / "run.yaml", {"backbone": "test_resnet", "pretrained_path": str(evil)})
    assert main(["pretrain", "--run-config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert str(evil) in capsys.readouterr().err


def test_a_normalisation_of_unequal_lengths_is_refused(tmp_path):
    weights = _save(timm.create_model("test_resnet"), tmp_path / "w.safetensors")
    with pytest.raises(HSATError, match="model.mean"):
        import_encoder({"method": {"name": "pretrained"}, "model": {"backbone": "test_resnet", "pretrained_path": str(weights),
                                                                    "mean": [0.5, 0.5, 0.5], "std": [0.2]}}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_pretrained_entry_without_weights_is_refused(tmp_path):
    with pytest.raises(HSATError, match="model.pretrained_path"):
        import_encoder({"method": {"name": "pretrained"}, "model": {"backbone": "test_resnet"}}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_training_a_pretrained_entry_is_refused_with_the_reason(tmp_path):
    with pytest.raises(HSATError, match="trains nothing"):
        pretrain({"method": {"name": "pretrained"}, "data": {"manifest": "unused.csv"},
                  "model": {"backbone": "test_resnet"}}, tmp_path / "run")


def test_replacing_a_trained_run_drops_its_training_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss_total": 1.0}\n', encoding="utf-8")
    (run / "checkpoint.pt").write_bytes(b"old")
    weights = _save(timm.create_model("test_resnet"), tmp_path / "w.safetensors")
    import_encoder({"method": {"name": "pretrained"}, "model": {"backbone": "test_resnet", "pretrained_path": str(weights)}},
                   run)
    assert not (run / "log.jsonl").exists() and not (run / "checkpoint.pt").exists()


def test_an_exported_encoder_is_a_weights_file_to_import(tmp_path):
    """What `hsat export` writes (the backbone, timm's keys, the preprocessing as metadata) imports
    back to the same features."""
    from hsat.export import encoder_metadata, export_encoder

    torch.manual_seed(6)
    weights = _save(timm.create_model("test_resnet"), tmp_path / "w.safetensors")
    first = import_encoder({"method": {"name": "pretrained"}, "data": {"image_size": 16},
                            "model": {"backbone": "test_resnet", "pretrained_path": str(weights),
                                      "mean": [0.6, 0.5, 0.4], "std": [0.3, 0.2, 0.1]}}, tmp_path / "first")
    exported = export_encoder(first, tmp_path / "exported.safetensors")
    meta = encoder_metadata(exported)
    again = import_encoder({"method": {"name": "pretrained"}, "data": {"image_size": 16},
                            "model": {"backbone": meta["timm_model"], "pretrained_path": str(exported),
                                      "backbone_args": meta["model_kwargs"], "mean": meta["pretrained_cfg"]["mean"],
                                      "std": meta["pretrained_cfg"]["std"]}}, tmp_path / "again")
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_trained_model(again).encode(x), load_trained_model(first).encode(x))


# ----------------------------------------------------------------------------- the user's own code


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An installed module of the user's: `build` returns a small CNN encoder (with num_features or
    without), `broken` raises, `not_a_module` returns a dict, `unpooled` gives a feature map."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"{FACTORY_MODULE}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Encoder(nn.Module):
            def __init__(self, width, pool=True):
                super().__init__()
                self.conv = nn.Conv2d(3, width, 3, padding=1)
                self.pool = pool

            def forward(self, x):
                y = torch.relu(self.conv(x))
                return y.mean(dim=(2, 3)) if self.pool else y

        def build(width=6, announce=True):
            net = Encoder(width)
            if announce:
                net.num_features = width
            return net

        def broken(**kwargs):
            raise RuntimeError("weights of the user's encoder not found")

        def not_a_module(**kwargs):
            return {"width": 3}

        def unpooled(**kwargs):
            return Encoder(4, pool=False)
    """), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    yield f"{FACTORY_MODULE}"
    sys.modules.pop(FACTORY_MODULE, None)


@pytest.mark.parametrize("announce", [True, False])
def test_factory_encoder_with_its_weights_file(tmp_path, user_module, announce):
    import importlib

    torch.manual_seed(5)
    saved = importlib.import_module(user_module).build(width=7).eval()
    weights = _save(saved, tmp_path / "mine.safetensors")
    cfg = _run_config(tmp_path / "run.yaml", {"factory": f"{user_module}:build", "pretrained_path": str(weights),
                                              "backbone_args": {"width": 7, "announce": announce}})
    assert main(["pretrain", "--run-config", str(cfg), "--out", str(tmp_path / "run")]) == 0

    model = load_trained_model(tmp_path / "run", fold_bn=True)
    assert model.num_features == 7
    x = torch.rand(4, 3, 16, 16)
    imagenet = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), saved((x - imagenet[0]) / imagenet[1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("spec", "says"), [
    ("no_such_package_xyz.encoders:build", "cannot import"),
    (f"{FACTORY_MODULE}:missing", "cannot import"),
    (f"{FACTORY_MODULE}:broken", "weights of the user's encoder not found"),
    (f"{FACTORY_MODULE}:not_a_module", "not a torch nn.Module"),
    (f"{FACTORY_MODULE}:unpooled", "(N, D) features"),
])
def test_factory_failures_exit_2_naming_the_key(tmp_path, user_module, capsys, spec, says):
    cfg = _run_config(tmp_path / "run.yaml", {"factory": spec})
    assert main(["pretrain", "--run-config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "model.factory" in err and spec in err and says in err
    assert not (tmp_path / "run").exists()


def test_factory_is_validated_as_module_colon_function(tmp_path, capsys):
    cfg = _run_config(tmp_path / "run.yaml", {"factory": "just_a_module"})
    assert main(["pretrain", "--run-config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "model.factory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- in the study's DAG


def _overlay_with_an_external_encoder(workdir: Path, weights: str) -> str:
    """The tiny study with HSAT (trained), `ext` (a timm encoder saved to a local file, in every
    per-model evaluation list) and `own` (the user's factory, its backbone name a label that
    reads as a ViT's; attention maps on for every ViT)."""
    import yaml

    tiny = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text(encoding="utf-8"))
    tiny["results_dir"] = "results/ext"
    tiny["models"] = {
        "hsat": {"method": {"name": "hsat"}, "group": "scratch"},
        "ext": {"method": {"name": "pretrained"}, "group": "external",
                "model": {"backbone": "test_resnet", "pretrained_path": weights}},
        "own": {"method": {"name": "pretrained"}, "group": "external",
                "model": {"backbone": "my_vit", "factory": "my_lab.encoders:build"}},
    }
    ev = tiny["evaluation"]
    ev["transfer"]["models"] = ev["mil"]["models"] = ["hsat", "ext"]
    ev["sanity"]["models"] = ["ext"]
    ev["attention"] = {"enabled": True, "models": []}
    ev["shift"] = {"enabled": False}  # the tiny study's shift list names models this overlay drops
    (workdir / "config" / "ext.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False), encoding="utf-8")
    return "config/ext.yaml"


@pytest.mark.slow
def test_dry_run_imports_the_external_encoder_and_evaluates_it(tmp_path):
    from test_workflow import copy_workflow, planned_jobs, snakemake

    workdir = copy_workflow(tmp_path / "wf")
    torch.manual_seed(0)
    _save(timm.create_model("test_resnet"), workdir / "ext.safetensors")
    overlay = _overlay_with_an_external_encoder(workdir, "ext.safetensors")

    proc = snakemake("-n", "-p", "all", "--configfile", overlay, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    assert jobs["pretrain"] == 1 and jobs["import_encoder"] == 2  # HSAT trains, ext and own are read
    assert jobs["evaluate"] == 3 and jobs["sanity"] == 1 and jobs["transfer_craft"] == 2
    assert "attention" not in jobs  # a factory's module is no timm ViT, whatever its label says
    lines = proc.stdout.splitlines()
    assert any("hsat pretrain" in line and "--model ext " in line for line in lines)
    assert not any("--live-dir" in line and "--model ext " in line for line in lines)  # no training job for it
    assert any("hsat embed " in line and "runs/ext" in line for line in lines)

    (workdir / "ext.safetensors").unlink()  # the weights file is the import's input: its absence stops the plan
    proc = snakemake("-n", "all", "--configfile", overlay, cwd=workdir)
    assert proc.returncode != 0 and "ext.safetensors" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- fine-tuning from an encoder


def _encoder_run(tmp_path: Path, name: str = "enc", seed: int = 7, backbone: str = "test_resnet", **kwargs) -> tuple[Path, torch.nn.Module]:
    """An imported timm encoder's run directory (16 px) and the timm model whose weights it holds."""
    torch.manual_seed(seed)
    saved = timm.create_model(backbone, **kwargs).eval()
    weights = _save(saved, tmp_path / f"{name}.safetensors")
    args = {"patch_size": kwargs["patch_size"]} if "patch_size" in kwargs else {}
    run = import_encoder({"method": {"name": "pretrained"}, "data": {"image_size": 16},
                          "model": {"backbone": backbone, "pretrained_path": str(weights), "backbone_args": args,
                                    "head_hidden": [8], "embed_dim": 4}}, tmp_path / name)
    return run, saved


def _fine_tune_cfg(manifest: Path, source: Path, **model) -> dict:
    from test_train import tiny_cfg

    cfg = tiny_cfg(manifest, train={"steps": 2, "log_every": 1, "checkpoint_every": 2},
                   init_from={"model": "enc", "run": str(source)})
    cfg["model"].update(model)
    return cfg


def test_fine_tuning_starts_from_the_encoders_backbone_and_pins_its_hash(tiny_manifest, tmp_path, monkeypatch):
    import hsat.train
    from hsat.config import read_yaml
    from hsat.encoders import file_sha256

    source, saved = _encoder_run(tmp_path)
    first: dict[str, torch.Tensor] = {}
    real_step = hsat.train.hsat_step

    def spy(model, *args, **kwargs):  # the backbone the first optimiser step starts from
        if not first:
            first.update({k: v.detach().clone() for k, v in model.backbone.state_dict().items()})
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(hsat.train, "hsat_step", spy)
    run = pretrain(_fine_tune_cfg(tiny_manifest, source), tmp_path / "tuned")

    want = {k: v for k, v in saved.state_dict().items() if not k.startswith("fc.")}  # the classifier is not the backbone's
    assert set(first) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(first[key], value, rtol=0, atol=0, msg=key)
    recorded = read_yaml(run / "config.yaml")["init_from"]
    assert recorded == {"model": "enc", "run": str(source), "sha256": file_sha256(source / "model.safetensors")}
    trained = load_trained_model(run).backbone.state_dict()
    assert any(not torch.equal(trained[k], want[k]) for k in want if want[k].is_floating_point())  # and it trained

    # The same source: a finished run, nothing to do. Another source: a changed config, not resumed.
    assert pretrain(_fine_tune_cfg(tiny_manifest, source), run) == run
    _encoder_run(tmp_path, seed=8)  # the encoder's weights replaced in the same run directory
    with pytest.raises(HSATError, match="init_from.sha256"):
        pretrain(_fine_tune_cfg(tiny_manifest, source), run)


def test_a_pinned_hash_that_does_not_match_is_refused(tiny_manifest, tmp_path):
    source, _ = _encoder_run(tmp_path)
    cfg = _fine_tune_cfg(tiny_manifest, source)
    cfg["init_from"]["sha256"] = "0" * 64
    with pytest.raises(HSATError, match=f"init_from.sha256: {source / 'model.safetensors'}"):
        pretrain(cfg, tmp_path / "tuned")
    assert not (tmp_path / "tuned" / "config.yaml").exists()


def test_a_source_of_another_architecture_exits_2_naming_the_file_and_writes_nothing(tiny_manifest, tmp_path, capsys):
    source, _ = _encoder_run(tmp_path, backbone="test_vit", img_size=16, patch_size=4)
    cfg = write_yaml(tmp_path / "run.yaml", _fine_tune_cfg(tiny_manifest, source, backbone="test_resnet")) or tmp_path / "run.yaml"
    assert main(["pretrain", "--run-config", str(cfg), "--out", str(tmp_path / "tuned")]) == 2
    err = capsys.readouterr().err
    assert str(source / "model.safetensors") in err and "does not fit this model's backbone" in err and "missing" in err
    assert not (tmp_path / "tuned" / "config.yaml").exists() and not (tmp_path / "tuned" / "model.safetensors").exists()


def test_a_missing_source_run_is_named(tiny_manifest, tmp_path):
    with pytest.raises(HSATError, match=r"init_from.run: .*nowhere.*model.safetensors not found \(train or import model 'enc'"):
        pretrain(_fine_tune_cfg(tiny_manifest, tmp_path / "nowhere"), tmp_path / "tuned")


STUDY_BASE = {"results_dir": "res", "pretrain": {"model": {"backbone": "test_resnet"}, "data": {"image_size": 16}},
              "models": {"hsat": {"method": {"name": "hsat"}}}}


def _study(models: dict, **extra) -> dict:
    from hsat.config import resolve_study

    return resolve_study({**STUDY_BASE, **extra}, [{"models": models}])[0]


def test_a_fine_tuned_model_inherits_the_encoders_architecture_unless_it_sets_it():
    from hsat.config import run_config_for_model

    enc = {"method": {"name": "pretrained"}, "data": {"image_size": 24},
           "model": {"backbone": "test_vit", "pretrained_path": "w.safetensors", "backbone_args": {"patch_size": 4},
                     "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}}
    study = _study({"enc": enc, "tuned": {"method": {"name": "hsat"}, "init_from": "enc"},
                    "own": {"method": {"name": "hidisc"}, "init_from": "enc", "group": "mine",
                            "model": {"backbone_args": {"drop_path_rate": 0.1}}, "data": {"image_size": 32}}})
    tuned = run_config_for_model(study, "tuned")
    assert tuned["model"]["backbone"] == "test_vit" and tuned["model"]["backbone_args"] == {"patch_size": 4}
    assert tuned["model"]["mean"] == [0.5, 0.5, 0.5] and tuned["data"]["image_size"] == 24
    assert tuned["model"]["pretrained_path"] is None  # the weights come from the run, not the file again
    assert tuned["init_from"] == {"model": "enc", "run": str(Path("res") / "runs" / "enc"), "sha256": None}
    own = run_config_for_model(study, "own")
    assert own["model"]["backbone_args"] == {"patch_size": 4, "drop_path_rate": 0.1} and own["data"]["image_size"] == 32
    assert study["models"]["tuned"]["group"] == "from enc" and study["models"]["own"]["group"] == "mine"
    assert run_config_for_model(study, "enc")["init_from"] is None


@pytest.mark.parametrize(("models", "says"), [
    ({"tuned": {"method": {"name": "hsat"}, "init_from": "nope"}}, "models.tuned.init_from: 'nope' is not a model of the study"),
    ({"a": {"init_from": "b"}, "b": {"init_from": "a"}}, "starts a cycle"),
    ({"tuned": {"method": {"name": "hsat"}, "init_from": "tuned"}}, "starts a cycle"),
    ({"enc": {"method": {"name": "pretrained"}, "model": {"pretrained_path": "w.safetensors"}},
      "bad": {"method": {"name": "pretrained"}, "init_from": "enc"}}, "models.bad.init_from: 'enc': method 'pretrained' trains nothing"),
    ({"enc": {"method": {"name": "pretrained"}, "model": {"pretrained_path": "w.safetensors"}},
      "both": {"init_from": "enc", "model": {"pretrained_path": "x.safetensors"}}}, "model.pretrained_path both"),
    ({"tuned": {"init_from": 3}}, "models.tuned.init_from: 3 is not of type 'string'"),
])
def test_bad_init_from_is_refused_naming_the_key_and_value(models, says):
    with pytest.raises(HSATError, match=re.escape(says)):
        _study(models)


def test_bad_init_from_exits_2_from_the_command_line(tmp_path, capsys):
    study = tmp_path / "study.yaml"
    write_yaml(study, {"models": {"tuned": {"method": {"name": "hsat"}, "init_from": "missing_encoder"}}})
    assert main(["config", "show", "--study", str(study)]) == 2
    assert "models.tuned.init_from: 'missing_encoder' is not a model of the study" in capsys.readouterr().err


def _claim_rows(models: dict[str, tuple[str, str, int, float, float]]):
    """Patch-level whitebox rows (kNN, eps 8): model -> (method, group, seed, clean acc, worst-case acc)."""
    import pandas as pd

    rows = []
    for model, (method, group, seed, clean, worst) in models.items():
        for attack, eps, acc in (("none", 0.0, clean), ("pgd", 8.0, worst + 1), ("worst_case", 8.0, worst)):
            rows.append({"model": model, "method": method, "group": group, "seed": seed, "attack": attack, "eps": eps,
                         "objective": "none" if attack == "none" else "feature", "classifier": "knn", "level": "patch",
                         "acc": acc, "mca": acc})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("sources", [3, 1])
def test_the_fine_tuning_claim_judges_the_worst_case_gain_and_measures_the_clean_cost(sources):
    from hsat.report.claims import HOLDS, UNJUDGED, claims

    models, entries = {}, {}
    for s in range(3):
        enc = f"enc_s{s}" if sources == 3 else "enc"
        entries[enc] = {"method": {"name": "pretrained"}, "model": {"pretrained_path": "w.safetensors"}, "group": "from enc", "seed": s}
        entries[f"tuned_s{s}"] = {"method": {"name": "hsat"}, "init_from": enc, "seed": s}
        spread = s if sources == 3 else 1  # one encoder: the three sources' mean
        models[enc] = ("pretrained", "from enc", s, 80.0 + spread, 10.0 + spread)
        models[f"tuned_s{s}"] = ("hsat", "from enc", s, 70.0 + s, 40.0 + s)
    study = _study(entries, evaluation={"max_val_patches": 100})
    found = [c for c in claims(_claim_rows(models), None, None, study) if c["id"] == "finetune_worst_case"]
    assert len(found) == 1
    c = found[0]
    assert c["group"] == "from enc" and c["numbers"]["clean_cost"] == pytest.approx(10.0)
    assert c["numbers"]["difference"] == pytest.approx(30.0) and "clean" in c["measured"]
    if sources == 3:
        assert c["verdict"] == HOLDS and len(c["numbers"]["tests"]) == 2  # the gain and the clean cost, each tested
        lo, hi = c["numbers"]["tests"][1]["interval"]
        assert lo < 10.0 < hi
    else:
        assert c["verdict"] == UNJUDGED and "fewer than 3 seeds" in c["reason"]


def _fine_tune_study(workdir: Path, weights: str, init_from: str = "ext") -> str:
    """The tiny study's `ext` and `hsat_ext` alone (as config/tiny.yaml names them), `ext` read
    from the timm encoder the test saved to `weights`; the evaluations beside the sweep off."""
    import yaml

    tiny = yaml.safe_load((workdir / "config" / "tiny.yaml").read_text(encoding="utf-8"))
    ext, tuned = tiny["models"]["ext"], tiny["models"]["hsat_ext"]
    ext["model"] = {"backbone": "test_resnet", "pretrained_path": weights}
    tuned["init_from"] = init_from
    tiny["results_dir"] = "results/ft"
    tiny["models"] = {"ext": ext, "hsat_ext": tuned}
    ev = tiny["evaluation"]
    for section in ("transfer", "sanity", "mil", "attention", "language", "shift"):
        ev[section] = {"enabled": False, "models": []}
    (workdir / "config" / "ft.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False), encoding="utf-8")
    return "config/ft.yaml"


def _dag_edges(dot: str) -> set[tuple[str, str]]:
    """(rule model, rule model) edges of `snakemake --dag` (Graphviz) output."""
    import re as _re

    labels = {m.group(1): m.group(2).replace("\\n", " ") for m in _re.finditer(r'^\s*(\d+)\[label = "([^"]*)"', dot, _re.M)}
    return {(labels[a], labels[b]) for a, b in _re.findall(r"^\s*(\d+) -> (\d+)", dot, _re.M)}


@pytest.mark.slow
def test_dry_run_orders_the_fine_tuning_after_its_encoder(tmp_path):
    from test_workflow import copy_workflow, planned_jobs, snakemake

    workdir = copy_workflow(tmp_path / "wf")
    torch.manual_seed(0)
    _save(timm.create_model("test_resnet"), workdir / "ext.safetensors")
    study = _fine_tune_study(workdir, "ext.safetensors")

    proc = snakemake("-n", "all", "--configfile", study, cwd=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = planned_jobs(proc)
    assert jobs["import_encoder"] == 1 and jobs["pretrain"] == 1 and jobs["evaluate"] == 2
    block = next(b for b in proc.stdout.split("rule ") if b.startswith("pretrain:") and "model=hsat_ext" in b)
    assert "results/ft/runs/ext/model.safetensors" in block.split("input:", 1)[1].splitlines()[0]
    dag = snakemake("--dag", "dot", "all", "--configfile", study, cwd=workdir)
    assert dag.returncode == 0, dag.stderr[-3000:]
    edges = _dag_edges(dag.stdout)
    assert ("import_encoder model: ext", "pretrain model: hsat_ext") in edges

    study = _fine_tune_study(workdir, "ext.safetensors", init_from="no_such_model")
    proc = snakemake("-n", "all", "--configfile", study, cwd=workdir)
    assert proc.returncode == 2 and "models.hsat_ext.init_from: 'no_such_model' is not a model of the study" in proc.stderr


@pytest.mark.slow
def test_tiny_study_evaluates_the_encoder_and_hsat_fine_tuned_from_it(tmp_path):
    """One real run of the tiny DAG for the two models: the fine-tuned backbone starts from the
    encoder's, both are in whitebox.csv, the claim names them; replacing the encoder's weights
    reruns both chains."""
    import json

    import pandas as pd

    from hsat.config import read_yaml
    from hsat.encoders import file_sha256
    from test_workflow import copy_workflow, planned_jobs, snakemake

    workdir = copy_workflow(tmp_path / "wf")
    torch.manual_seed(0)
    saved = timm.create_model("test_resnet").eval()
    _save(saved, workdir / "ext.safetensors")
    study = _fine_tune_study(workdir, "ext.safetensors")
    proc = snakemake("results/ft/claims.md", "--cores", "2", "--configfile", study, cwd=workdir)  # figures aside
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = workdir / "results" / "ft"

    assert (res / "benchmarks" / "import_encoder" / "ext.tsv").is_file()
    assert not (res / "benchmarks" / "pretrain" / "ext.tsv").exists()  # the encoder trains nothing
    tuned_cfg = read_yaml(res / "runs" / "hsat_ext" / "config.yaml")
    assert tuned_cfg["init_from"]["sha256"] == file_sha256(res / "runs" / "ext" / "model.safetensors")
    # 3 steps at lr <= 1e-3 move a parameter by a few 1e-3 (Adam; batch-norm running statistics
    # move faster and are left out): the backbone is still the encoder's, while an independently
    # initialised one differs by far more.
    tuned = load_trained_model(res / "runs" / "hsat_ext").backbone.state_dict()
    want = {k: v.detach() for k, v in saved.named_parameters() if k in tuned}
    assert len(want) > 10
    torch.manual_seed(1)
    other = timm.create_model("test_resnet").state_dict()
    assert max(float((tuned[k] - v).abs().max()) for k, v in want.items()) < 0.05
    assert max(float((other[k] - v).abs().max()) for k, v in want.items()) > 0.2

    wb = pd.read_csv(res / "whitebox.csv")
    assert {"ext", "hsat_ext"} <= set(wb.loc[wb["attack"] == "worst_case", "model"])
    assert set(wb.loc[wb["model"] == "hsat_ext", "group"]) == {"from ext"}
    claims_md = (res / "claims.md").read_text(encoding="utf-8")
    assert "finetune_worst_case" in claims_md and "HSAT from ext" in claims_md
    metrics = json.loads((res / "metrics.json").read_text(encoding="utf-8"))
    assert "finetune_worst_case" in json.dumps(metrics)

    torch.manual_seed(2)  # another encoder in the same file: both models are redone
    _save(timm.create_model("test_resnet"), workdir / "ext.safetensors")
    jobs = planned_jobs(snakemake("-n", "results/ft/claims.md", "--configfile", study, cwd=workdir))
    assert jobs.get("import_encoder") == 1 and jobs.get("pretrain") == 1 and jobs.get("evaluate") == 2, jobs
