"""DINO as a method of the study: teacher/student training, multi-crop, hierarchical positives,
robust DINO, checkpoints that resume exactly, and the exported teacher through the evaluation."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_train import Kill, kill_at, read_log, tiny_cfg, weights

from hsat.config import load_run_config
from hsat.data.manifest import read_manifest
from hsat.data.sampler import HierarchicalDataset
from hsat.errors import HSATError
from hsat.methods import DINO, Robust, build_objective, resolve_method
from hsat.methods.dino import partner_targets
from hsat.models import build_model, load_trained_model
from hsat.train import embed_views, load_checkpoint, pretrain

torch.set_num_threads(1)

SMALL_DINO = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8}


def dino_cfg(manifest, name="dino", **dino):
    cfg = tiny_cfg(manifest, method={"name": name, "dino": {**SMALL_DINO, **dino}})
    cfg["data"]["local_crops"] = {"number": 2, "size": 8}
    return cfg


def test_dino_run_trains_the_student_and_exports_the_ema_teacher(tiny_manifest, tmp_path):
    run = pretrain(dino_cfg(tiny_manifest), tmp_path / "run")
    log = read_log(run)
    assert len(log) == 6 and all("loss_clean_dino" in r for r in log)
    state = load_checkpoint(run / "checkpoint.pt")
    teacher, student = state["objective"]["teacher"], state["model"]
    exported = weights(run)
    assert set(exported) == set(teacher)
    assert all(torch.equal(exported[k], teacher[k]) for k in teacher)  # model.safetensors is the teacher
    # the teacher is an EMA, neither the student nor its initial copy
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher if teacher[k].is_floating_point())
    assert state["objective"]["center"].abs().sum() > 0


def test_dino_resume_after_kill_equals_uninterrupted_run(tiny_manifest, tmp_path):
    cfg = dino_cfg(tiny_manifest)
    cfg["augment"] = {"strength": 0.5}
    full = pretrain(cfg, tmp_path / "full")
    with pytest.raises(Kill):
        pretrain(cfg, tmp_path / "killed", callback=kill_at(4))
    resumed = pretrain(cfg, tmp_path / "killed")
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(resumed / "checkpoint.pt")
    assert torch.equal(ca["objective"]["center"], cb["objective"]["center"])


def test_dino_freezes_the_prototypes_and_schedules_the_weight_decay(tiny_manifest, tmp_path):
    cfg = dino_cfg(tiny_manifest, freeze_last_layer_steps=6)
    cfg["optim"]["weight_decay"], cfg["optim"]["weight_decay_end"] = 0.04, 0.4
    cfg["train"]["steps"] = 6
    run = pretrain(cfg, tmp_path / "run")
    torch.manual_seed(cfg["seed"])
    init = build_model("test_resnet", head_hidden=(32,), embed_dim=16, image_size=16,
                       dino_head={**SMALL_DINO, "nlayers": 3}).state_dict()
    student = load_checkpoint(run / "checkpoint.pt")["model"]
    proto = [k for k in student if k.startswith("head.last_layer")]
    assert proto and all(torch.equal(student[k], init[k]) for k in proto)  # untouched for 6 steps
    assert not torch.equal(student["head.mlp.0.weight"], init["head.mlp.0.weight"])  # the rest trained
    wd = load_checkpoint(run / "checkpoint.pt")["optimizer"]["param_groups"][0]["weight_decay"]
    assert 0.3 < wd <= 0.4  # cosine from 0.04 towards 0.4 at the last of 6 steps


def test_local_crops_come_with_the_batch(tiny_manifest):
    ds = HierarchicalDataset(read_manifest(tiny_manifest), image_size=16, local_crops={"number": 3, "size": 8})
    item = ds[0]
    assert item["images"].shape[:3] == (2, 2, 2) and item["local_images"].shape == (2, 2, 3, 3, 8, 8)
    assert "local_images" not in HierarchicalDataset(read_manifest(tiny_manifest), image_size=16)[0]
    with pytest.raises(HSATError, match="local_crops.scale"):
        HierarchicalDataset(read_manifest(tiny_manifest), image_size=16, local_crops={"number": 1, "scale": [0.5, 0.2]})


def test_hierarchical_positives_pair_a_patch_with_its_slide_or_patient_partner():
    t = torch.arange(2 * 2 * 3 * 2).float().view(2, 2, 3, 2, 1)  # (P, S, K, V, D)
    assert torch.equal(partner_targets(t, "patch"), t)
    assert torch.equal(partner_targets(t, "slide")[:, :, 0], t[:, :, 1])  # next patch of the same slide
    assert torch.equal(partner_targets(t, "patient")[:, 0], t[:, 1])  # same position on the next slide
    assert torch.equal(partner_targets(t, "slide")[1], t[1].roll(-1, dims=1))  # never another patient
    with pytest.raises(HSATError, match="num_patch_samples"):
        partner_targets(t[:, :, :1], "slide")


@pytest.mark.parametrize("positives", ["slide", "patient"])
def test_hierarchical_dino_trains(tiny_manifest, tmp_path, positives):
    run = pretrain(dino_cfg(tiny_manifest, positives=positives), tmp_path / positives)
    assert all(torch.isfinite(torch.tensor(r["loss_total"])) for r in read_log(run))


def _objective_on(model, name="robust_dino"):
    cfg = load_run_config(None, [f"method.name={name}"])
    method = resolve_method({**cfg["method"], "dino": {**cfg["method"]["dino"], **SMALL_DINO}})
    objective = build_objective(method)
    objective.setup(model, total_steps=10)
    return objective, cfg["attack"]


def test_robust_dino_attack_raises_the_dino_loss_it_trains_on():
    torch.manual_seed(0)
    model = build_model("test_resnet", head_hidden=(32,), embed_dim=16, image_size=16,
                        dino_head={**SMALL_DINO, "nlayers": 3})
    objective, attack = _objective_on(model)
    assert isinstance(objective, Robust) and isinstance(objective.inner, DINO)
    shape = (2, 2, 2, 2)
    x = torch.rand(16, 3, 16, 16)
    objective.begin_step(model, x, shape, step=0, embed=embed_views, autocast=contextlib.nullcontext)
    with torch.no_grad():
        (z,) = embed_views(model, x, shape)
        clean = float(objective.attack_loss(z))
    _, x_adv = objective.training_views(model, x, shape, attack={**attack, "steps": 5}, eps=8.0, embed=embed_views,
                                        generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        (z_adv,) = embed_views(model, x_adv, shape)
        adv = float(objective.attack_loss(z_adv))
    assert adv > clean + 1e-3, (clean, adv)


def test_robust_dino_run_and_its_teacher_evaluate(tiny_manifest, tmp_path):
    """The exported teacher loads for evaluation (DINO head rebuilt from the run config, batch
    norm folded) and gives the same features as the unfolded model."""
    run = pretrain(dino_cfg(tiny_manifest, name="robust_dino"), tmp_path / "run")
    assert all("loss_adv_dino" in r for r in read_log(run))
    plain, folded = load_trained_model(run), load_trained_model(run, fold_bn=True)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(plain.encode(x), folded.encode(x), atol=1e-4)
        assert plain(x).shape == (4, SMALL_DINO["out_dim"])  # prototype scores


def test_dino_needs_setup_before_a_step():
    model = build_model("test_resnet", head_hidden=(32,), embed_dim=16, image_size=16,
                        dino_head={**SMALL_DINO, "nlayers": 3})
    objective = DINO(resolve_method({"name": "dino", "dino": {**SMALL_DINO, "positives": "patch"}}))
    with pytest.raises(HSATError, match="setup"):
        objective.begin_step(model, torch.rand(16, 3, 16, 16), (2, 2, 2, 2), step=0, embed=embed_views,
                             autocast=contextlib.nullcontext)


def test_vit_student_takes_local_crops_of_another_size(tiny_manifest, tmp_path):
    """A ViT with patch size 4 (model.backbone_args) trains on 16 px global and 8 px local crops:
    the position embeddings interpolate (timm's dynamic_img_size, switched on for local crops)."""
    cfg = dino_cfg(tiny_manifest)
    cfg["model"] = {"backbone": "test_vit", "backbone_args": {"patch_size": 4}}
    cfg["train"] = {"steps": 2, "log_every": 1, "checkpoint_every": 2}
    run = pretrain(cfg, tmp_path / "vit")
    model = load_trained_model(run)
    assert model.backbone.patch_embed.patch_size == (4, 4)
    assert model.encode(torch.rand(2, 3, 16, 16)).shape == (2, model.num_features)


def test_cli_attention_draws_a_vit_runs_heads(tiny_manifest, tmp_path):
    from hsat.cli import main

    cfg = dino_cfg(tiny_manifest)
    cfg["model"] = {"backbone": "test_vit", "backbone_args": {"patch_size": 4}}
    cfg["train"] = {"steps": 1, "log_every": 1, "checkpoint_every": 1}
    run = pretrain(cfg, tmp_path / "vit")
    study = tmp_path / "study.yaml"
    study.write_text("models: {vit: {method: {name: dino}}}\n")
    out = tmp_path / "fig"
    assert main(["attention", "--run", str(run), "--manifest", str(tiny_manifest), "--study", str(study),
                 "--out-dir", str(out)]) == 0
    assert (out / "attention_vit.png").stat().st_size > 0 and (out / "attention_vit.pdf").is_file()
    # a CNN run is a clear error (exit 2)
    cnn = pretrain(dino_cfg(tiny_manifest), tmp_path / "cnn")
    assert main(["attention", "--run", str(cnn), "--manifest", str(tiny_manifest), "--study", str(study),
                 "--out-dir", str(out)]) == 2


def test_attention_maps_are_stored_clean_and_attacked_and_drawn_by_the_report(tiny_manifest, tmp_path):
    from safetensors.torch import save_file

    from hsat.cli import main
    from hsat.evaluate.attention import read_attention_maps

    cfg = dino_cfg(tiny_manifest)
    cfg["model"] = {"backbone": "test_vit", "backbone_args": {"patch_size": 4}}
    cfg["train"] = {"steps": 1, "log_every": 1, "checkpoint_every": 1}
    run = pretrain(cfg, tmp_path / "vit")
    study = tmp_path / "study.yaml"
    study.write_text("models: {vit: {method: {name: dino}}}\nevaluation: {attention: {eps: 8}}\n")
    maps = tmp_path / "attention" / "vit.safetensors"
    assert main(["attention", "--run", str(run), "--manifest", str(tiny_manifest), "--study", str(study),
                 "--model", "vit", "--out", str(maps)]) == 0
    tensors, meta = read_attention_maps(maps)
    assert meta["model"] == "vit" and meta["eps"] == 8 and meta["objective"] == "feature"
    delta = (tensors["adv_images"] - tensors["images"]).abs()
    assert float(delta.max()) <= 8 / 255 + 1e-6 and float(delta.mean()) > 1 / 255  # moved, within the ball
    assert tensors["clean"].shape == tensors["adv"].shape and tensors["clean"].shape[0] == len(tensors["labels"])
    assert float(tensors["clean"].flatten(2).sum(2).max()) <= 1 + 1e-5  # per head: attention mass on the patch tokens
    figs = tmp_path / "figures"
    assert main(["report", "attention", "--maps", str(maps), "--out-dir", str(figs)]) == 0
    assert (figs / "attention.png").stat().st_size > 0 and (figs / "attention.pdf").is_file()
    drawn = tmp_path / "drawn"  # `hsat attention --out-dir`: the maps written there and drawn as the report draws them
    assert main(["attention", "--run", str(run), "--manifest", str(tiny_manifest), "--study", str(study),
                 "--model", "vit", "--out-dir", str(drawn)]) == 0
    assert (drawn / "attention_vit.safetensors").is_file() and (drawn / "attention_vit.png").stat().st_size > 0
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert main(["report", "attention", "--maps", str(tmp_path / "other.safetensors"), "--out-dir", str(figs / "x")]) == 2
    assert not (figs / "x").exists() or not any((figs / "x").iterdir())
