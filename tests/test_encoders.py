"""Encoders the study did not train: a run directory made from a saved timm model's weights, or
from the user's own factory, gives the saved model's features; bad files and factories are
refused with exit status 2, naming the file or the key, and nothing is written."""

from __future__ import annotations

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
