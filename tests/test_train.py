"""Pretraining on the embedded cohort: loss falls, resume is exact, checkpoints run no code."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import hsat.methods.hidisc as hidisc_mod
import hsat.methods.robust as robust_mod
import hsat.train as train_mod
from hsat.errors import HSATError
from hsat.models import build_model
from hsat.train import (
    config_differences,
    cosine_schedule,
    linear_warmup,
    load_checkpoint,
    freeze_unused_head,
    pretrain,
    restart_from_checkpoint,
)


def tiny_cfg(manifest: Path, **sections) -> dict:
    """A seconds-long run: test_resnet, 16 px, 2 patients x 2 slides x 2 patches x 2 views."""
    cfg = {
        "device": "cpu",
        "threads": 1,
        "seed": 0,
        "precision": "fp32",
        "data": {"manifest": str(manifest), "image_size": 16, "patients_per_batch": 2, "num_workers": 0},
        "model": {"backbone": "test_resnet", "head_hidden": [32], "embed_dim": 16},
        "method": {"name": "hsat"},
        "attack": {"steps": 1, "warmup_steps": 0, "only_adversarial": False},
        "augment": {"strength": 0.0},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"steps": 6, "log_every": 1, "checkpoint_every": 3},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


class Kill(Exception):
    """Stands in for SIGKILL: raised from the step callback."""


def kill_at(step: int):
    def callback(done: int, record: dict) -> None:
        if done == step:
            raise Kill(done)

    return callback


# ---------------------------------------------------------------------------------------------
# schedules and bookkeeping


def test_cosine_schedule_warms_up_then_decays_to_min():
    s = cosine_schedule(1e-3, 1e-5, total_steps=100, warmup_steps=10)
    assert len(s) == 100 and s[0] == 0.0
    assert np.all(np.diff(s[:11]) > 0) and s[10] == pytest.approx(1e-3)
    assert np.all(np.diff(s[10:]) <= 0) and s[-1] == pytest.approx(1e-5, abs=1e-6)
    assert cosine_schedule(1.0, 0.0, 5, warmup_steps=50).max() < 1.0  # warm-up longer than the run


def test_linear_warmup_of_eps():
    e = linear_warmup(8.0, total_steps=10, warmup_steps=4)
    assert list(e[:5]) == [0.0, 2.0, 4.0, 6.0, 8.0] and np.all(e[4:] == 8.0)
    assert np.all(linear_warmup(8.0, 5, 0) == 8.0)


def test_config_differences_ignore_bookkeeping_only():
    a = {"train": {"steps": 10, "log_every": 1}, "attack": {"eps": 8}, "threads": 1}
    b = {"train": {"steps": 20, "log_every": 5}, "attack": {"eps": 4}, "threads": 2}
    assert config_differences(a, b) == ["attack.eps"]
    assert config_differences(a, a) == []


# ---------------------------------------------------------------------------------------------
# the method


def test_tiny_hsat_run_lowers_its_training_loss(tiny_manifest, tmp_path):
    # 4 patients per batch gives the contrastive levels enough negatives to learn in 40 steps.
    cfg = tiny_cfg(tiny_manifest, train={"steps": 40, "checkpoint_every": 40}, optim={"lr": 3e-3, "warmup_steps": 0})
    cfg["data"]["patients_per_batch"] = 4
    run = pretrain(cfg, tmp_path / "run")
    log = read_log(run)
    assert [r["step"] for r in log] == list(range(1, 41))
    expected = {"step", "lr", "eps", "strength", "clean_weight", "loss_total"}
    expected |= {f"loss_{kind}_{lvl}" for kind in ("clean", "adv") for lvl in ("patient", "slide", "patch")}
    assert expected <= set(log[0])
    assert log[0]["eps"] == 8.0 and "images_per_s" not in log[0]  # a timing: the job's log line, not the run's files
    losses = [r["loss_total"] for r in log]
    early, late = np.mean(losses[:5]), np.mean(losses[-10:])
    assert late < 0.95 * early, (early, late)
    assert {"config.yaml", "checkpoint.pt", "model.safetensors", "log.jsonl"} <= {p.name for p in run.iterdir()}


def test_variants_log_their_own_levels(tiny_manifest, tmp_path):
    hidisc = read_log(pretrain(tiny_cfg(tiny_manifest, method={"name": "hidisc"}, train={"steps": 2}), tmp_path / "h"))
    assert not any(k.startswith("loss_adv") for k in hidisc[-1]) and hidisc[-1]["eps"] == 0.0
    patch = read_log(pretrain(
        tiny_cfg(tiny_manifest, method={"name": "hsat_patch"}, attack={"steps": 1, "only_adversarial": True},
                 train={"steps": 2}), tmp_path / "p"))
    assert {k for k in patch[-1] if k.startswith("loss_")} == {"loss_total", "loss_adv_patch"}
    assert patch[-1]["loss_total"] == pytest.approx(patch[-1]["loss_adv_patch"])


def test_dynamic_augmentation_and_eps_warmup_follow_their_schedules(tiny_manifest, tmp_path):
    cfg = tiny_cfg(tiny_manifest, augment={"strength": 1.0, "min_strength": 0.0, "dynamic": True},
                   attack={"steps": 1, "warmup_steps": 4, "warmup_start": 0, "clean_weight": 0.5,
                           "only_adversarial": False}, train={"steps": 4})
    log = read_log(pretrain(cfg, tmp_path / "run"))
    assert [r["eps"] for r in log] == [0.0, 2.0, 4.0, 6.0]
    assert [r["strength"] for r in log] == [1.0, 0.75, 0.5, 0.25]
    # DynACL: w = 0.5 (1 - s); clean (1 - w) / 2, adversarial (1 + w) / 2
    assert [r["clean_weight"] for r in log] == pytest.approx([0.5, 0.4375, 0.375, 0.3125])
    assert [r["adv_weight"] for r in log] == pytest.approx([0.5, 0.5625, 0.625, 0.6875])
    started = read_log(pretrain(tiny_cfg(tiny_manifest, attack={"steps": 1, "warmup_steps": 4, "warmup_start": 1}),
                                tmp_path / "from1"))
    assert [r["eps"] for r in started[:4]] == [1.0, 2.75, 4.5, 6.25]  # the paper's warm-up from 1/255


def test_attack_builds_no_parameter_gradients(tiny_manifest, tmp_path, monkeypatch):
    """During PGD parameters are frozen and in eval mode; no .grad exists until the encoder's backward."""
    seen: dict = {"model": None, "attacks": 0, "objective_calls": 0}
    real_build, real_pgd = train_mod.model_from_config, robust_mod.pgd

    def build(cfg):
        seen["model"] = real_build(cfg)
        return seen["model"]

    def checked_pgd(x, objective, **kw):
        model = seen["model"]
        assert all(p.grad is None for p in model.parameters()), "stale parameter gradients before the attack"

        def watched(x_adv):
            seen["objective_calls"] += 1
            assert not any(p.requires_grad for p in model.parameters())
            assert not model.training  # attack.bn_mode = eval (the default)
            return objective(x_adv)

        x_adv = real_pgd(x, watched, **kw)
        assert all(p.grad is None for p in model.parameters()), "the attack populated parameter .grad"
        assert (x_adv - x).abs().max() <= kw["eps"] + 1e-6 and not torch.equal(x_adv, x)
        seen["attacks"] += 1
        return x_adv

    monkeypatch.setattr(train_mod, "model_from_config", build)
    monkeypatch.setattr(robust_mod, "pgd", checked_pgd)  # the robust wrapper's inner maximisation
    run = pretrain(tiny_cfg(tiny_manifest, attack={"steps": 2}, train={"steps": 2}), tmp_path / "run")
    assert seen["attacks"] == 2 and seen["objective_calls"] == 4
    assert all(p.requires_grad for p in seen["model"].parameters()) and seen["model"].training  # restored
    # ... and the encoder's backward did build them (the check above is not vacuous)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in seen["model"].parameters())
    assert (run / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# resume, checkpoints, failures


def test_resume_after_kill_equals_uninterrupted_run(tiny_manifest, tmp_path):
    # HSAT with a random start and augmentation on: every source of randomness must replay.
    cfg = tiny_cfg(tiny_manifest, augment={"strength": 0.5}, attack={"steps": 1, "random_start": True})
    full = pretrain(cfg, tmp_path / "full")

    with pytest.raises(Kill):
        pretrain(cfg, tmp_path / "killed", callback=kill_at(4))  # checkpoint at 3, log reaches 4
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 3
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    steps_run: list[int] = []
    resumed = pretrain(cfg, tmp_path / "killed", callback=lambda done, rec: steps_run.append(done))
    assert steps_run == [4, 5, 6]  # it resumed, rather than starting over

    a, b = weights(full), weights(resumed)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda log: [{k: v for k, v in r.items() if k != "images_per_s"} for r in log]  # noqa: E731
    assert strip(read_log(resumed)) == strip(read_log(full))  # entries past the checkpoint replaced

    # a finished run returns at once and rewrites nothing
    stamp = (resumed / "checkpoint.pt").stat().st_mtime_ns, (resumed / "model.safetensors").stat().st_mtime_ns
    pretrain(cfg, resumed)
    assert ((resumed / "checkpoint.pt").stat().st_mtime_ns, (resumed / "model.safetensors").stat().st_mtime_ns) == stamp

    # ... and refuses to continue under a different method, naming the keys
    with pytest.raises(HSATError, match=r"attack\.eps.*method\.max_levels|method\.max_levels.*attack\.eps"):
        pretrain({**cfg, "attack": {"steps": 1, "eps": 4}, "method": {"name": "hsat_lmax_patch"}}, resumed)


def test_changed_settings_restart_afresh_when_asked(tiny_manifest, tmp_path):
    # The workflow's mode: a run dir of other settings is discarded, not resumed and not refused.
    cfg = tiny_cfg(tiny_manifest, train={"steps": 3, "log_every": 1, "checkpoint_every": 3})
    other = tiny_cfg(tiny_manifest, train={"steps": 3, "log_every": 1, "checkpoint_every": 3}, seed=1)
    pretrain(cfg, tmp_path / "run")
    steps_run: list[int] = []
    pretrain(other, tmp_path / "run", on_config_change="restart", callback=lambda d, r: steps_run.append(d))
    assert steps_run == [1, 2, 3]  # started over
    fresh = pretrain(other, tmp_path / "fresh")
    a, b = weights(tmp_path / "run"), weights(fresh)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(read_log(tmp_path / "run")) == 3
    # fewer steps than the run holds: no resuming past the end, so it trains the shorter run anew
    shorter = tiny_cfg(tiny_manifest, train={"steps": 2, "log_every": 1, "checkpoint_every": 3}, seed=1)
    steps_run.clear()
    pretrain(shorter, tmp_path / "run", on_config_change="restart", callback=lambda d, r: steps_run.append(d))
    assert steps_run == [1, 2] and [r["step"] for r in read_log(tmp_path / "run")] == [1, 2]


def test_more_patients_per_batch_than_training_patients_takes_them_all(tiny_manifest, tmp_path, caplog):
    # A small cohort of one's own with the default study's batch: every training patient each
    # step, recorded in the run's config.yaml; the same command again finds the run finished.
    n_train = pd.read_csv(tiny_manifest).query("split == 'train'")["patient"].nunique()
    cfg = tiny_cfg(tiny_manifest, data={"patients_per_batch": n_train + 5}, train={"steps": 1})
    with caplog.at_level("WARNING", logger="hsat.train"):
        run = pretrain(cfg, tmp_path / "run")
    assert f"{n_train} training patients" in caplog.text
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["patients_per_batch"] == n_train
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    pretrain(cfg, run, on_config_change="error")  # the derived value is no config change
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp


def test_restart_from_checkpoint_decides_from_config_code_stamp_and_checkpoint(tiny_manifest, tmp_path, caplog):
    cfg = tiny_cfg(tiny_manifest, train={"steps": 3, "log_every": 1, "checkpoint_every": 1})
    run = tmp_path / "run"
    assert restart_from_checkpoint(run, cfg) == (None, False)  # nothing there: start at step 0
    with pytest.raises(Kill):
        pretrain(cfg, run, code_version="aaaa", callback=kill_at(2))
    norm = yaml.safe_load((run / "config.yaml").read_text())
    state, restart = restart_from_checkpoint(run, norm, code_version="aaaa")
    assert state["step"] == 2 and not restart  # same config and code: resume
    # other training code: the workflow's mode starts afresh, a user's resume only warns
    assert restart_from_checkpoint(run, norm, on_config_change="restart", code_version="bbbb") == (None, True)
    with caplog.at_level("WARNING", logger="hsat.train"):
        state, restart = restart_from_checkpoint(run, norm, code_version="bbbb")
    assert state["step"] == 2 and not restart and "other training code" in caplog.text
    with pytest.raises(HSATError, match=r"differing keys: seed"):
        restart_from_checkpoint(run, {**norm, "seed": 1})
    assert restart_from_checkpoint(run, {**norm, "seed": 1}, on_config_change="restart") == (None, True)
    with pytest.raises(HSATError, match=r"at step 2, beyond train\.steps=1"):
        restart_from_checkpoint(run, {**norm, "train": {**norm["train"], "steps": 1}})
    # fewer steps than the checkpoint's: the message says what to do; the workflow's mode retrains
    shorter = {**norm, "train": {**norm["train"], "steps": 1}}
    with pytest.raises(HSATError, match=r"train\.steps to at least 2 .*--restart-if-changed"):
        restart_from_checkpoint(run, shorter)
    assert restart_from_checkpoint(run, shorter, on_config_change="restart", code_version="aaaa") == (None, True)
    with pytest.raises(ValueError, match="on_config_change"):
        restart_from_checkpoint(run, norm, on_config_change="ignore")


def test_checkpoint_is_plain_data(tiny_manifest, tmp_path):
    run = pretrain(tiny_cfg(tiny_manifest, train={"steps": 2}), tmp_path / "run")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and set(state) >= {"model", "optimizer", "step", "rng", "config"}
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert set(state["model"]) == set(weights(run))
    assert yaml.safe_load((run / "config.yaml").read_text())["method"]["min_levels"] == ["patient", "slide", "patch"]


_DIE_IN_SAVE = """
import json, os, signal, sys
import torch
from hsat.train import pretrain


def die_mid_save(obj, f, *args, **kw):  # a SIGKILL halfway through writing checkpoint.pt
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)


torch.save = die_mid_save
pretrain(json.loads(sys.argv[1]), sys.argv[2])
"""


def test_a_kill_during_a_checkpoint_save_leaves_nothing_after_the_next_start(tiny_manifest, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    cfg = tiny_cfg(tiny_manifest, train={"steps": 3, "checkpoint_every": 2})
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(train_mod.__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _DIE_IN_SAVE, json.dumps(cfg), str(run)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = [p.name for p in run.iterdir() if p.name.startswith(".checkpoint.pt.")]
    assert len(left) == 1 and not (run / "checkpoint.pt").exists()  # what the kill leaves

    steps: list[int] = []
    pretrain(cfg, run, callback=lambda done, rec: steps.append(done))
    assert steps == [1, 2, 3]  # nothing to resume from: started afresh
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3


def test_checkpoint_bytes_do_not_depend_on_the_run_folder(tiny_manifest, tmp_path):
    """torch.save names the archive's members after the file it writes: written through a
    temporary file of a random name, two identical runs gave different checkpoint.pt files."""
    import zipfile

    cfg = tiny_cfg(tiny_manifest, train={"steps": 1})
    a, b = pretrain(cfg, tmp_path / "a"), pretrain(cfg, tmp_path / "deeper" / "b")
    assert (a / "checkpoint.pt").read_bytes() == (b / "checkpoint.pt").read_bytes()
    assert all(name.startswith("archive/") for name in zipfile.ZipFile(a / "checkpoint.pt").namelist())


def test_a_run_that_fails_before_its_first_step_blocks_no_corrected_rerun(tiny_manifest, tmp_path):
    from hsat.data.manifest import read_manifest, write_manifest

    table = read_manifest(tiny_manifest)
    extra = table[table["split"] == "train"].iloc[[-1]].assign(path=str(tmp_path / "gone.tif"))
    broken = tmp_path / "broken.csv"
    write_manifest(pd.concat([table, extra], ignore_index=True), broken)
    run = tmp_path / "run"
    with pytest.raises(HSATError, match="gone.tif"):
        pretrain(tiny_cfg(broken, train={"steps": 2}), run)
    assert not (run / "config.yaml").exists() and not (run / "code.version").exists()
    # killed after a step but before any checkpoint: config.yaml is there, nothing to resume
    with pytest.raises(Kill):
        pretrain(tiny_cfg(tiny_manifest, train={"steps": 2, "checkpoint_every": 2}), run, callback=kill_at(1))
    assert (run / "config.yaml").exists() and not (run / "checkpoint.pt").exists()
    fixed = tiny_cfg(tiny_manifest, seed=1, train={"steps": 2})  # other settings, same folder: accepted
    pretrain(fixed, run)
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1
    assert [r["step"] for r in read_log(run)] == [1, 2]


class _Payload:
    """Unpickling this calls open(marker, "w"): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_without_running_code(tiny_manifest, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "optimizer": {}, "step": 1, "x": _Payload(marker)}, evil)
    # the payload is live: a trusting load runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(HSATError, match="refusing to unpickle"):
        load_checkpoint(evil)
    assert not marker.exists()

    # the same through pretrain: a planted checkpoint.pt stops the resume
    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_manifest, train={"steps": 2})
    with pytest.raises(Kill):
        pretrain(cfg, run, callback=kill_at(1))
    (run / "checkpoint.pt").write_bytes(evil.read_bytes())
    with pytest.raises(HSATError, match="checkpoint.pt"):
        pretrain(cfg, run)
    assert not marker.exists()


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(tiny_manifest, tmp_path, monkeypatch):
    state = {"poisoned": False}
    real_loss = hidisc_mod.hierarchical_loss

    def loss(z, *args, **kw):
        out = real_loss(z, *args, **kw)
        if state["poisoned"]:
            out["total"] = out["total"] * math.nan
        return out

    def poison_after_3(done, record):
        if done == 3:
            state["poisoned"] = True

    monkeypatch.setattr(hidisc_mod, "hierarchical_loss", loss)  # the method's loss
    run = tmp_path / "run"
    with pytest.raises(HSATError, match=r"non-finite loss.*step 4.*step 3"):
        pretrain(tiny_cfg(tiny_manifest), run, callback=poison_after_3)
    good = load_checkpoint(run / "checkpoint.pt")
    assert good["step"] == 3
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert not (run / "model.safetensors").exists()
    assert max(r["step"] for r in read_log(run)) == 3


def test_missing_manifest_is_a_user_error(tmp_path):
    cfg = tiny_cfg(tmp_path / "nope.csv")
    cfg["data"]["manifest"] = None
    with pytest.raises(HSATError, match="data.manifest"):
        pretrain(cfg, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_pretrain_writes_the_run_directory(tiny_manifest, tmp_path, capsys):
    from hsat.cli import main
    from hsat.models import load_trained_model

    cfg = tiny_cfg(tiny_manifest, train={"steps": 2})
    del cfg["data"]["manifest"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(tmp_path / "run.yaml"), "--manifest", str(tiny_manifest),
                 "--out", str(out), "method.name=hsat_slide"]) == 0
    assert {"config.yaml", "model.safetensors", "checkpoint.pt", "log.jsonl"} <= {p.name for p in out.iterdir()}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"]["name"] == "hsat_slide" and saved["data"]["manifest"] == str(tiny_manifest)
    assert [r["step"] for r in read_log(out)] == [1, 2]
    model = load_trained_model(out)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 16)

    # the study form: the study's pretrain section merged with one model's overrides
    study = {"pretrain": {k: v for k, v in cfg.items()}, "models": {"base": {"method": {"name": "hidisc"}}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out2 = tmp_path / "base"
    assert main(["pretrain", "--study", str(tmp_path / "study.yaml"), "--model", "base",
                 "--manifest", str(tiny_manifest), "--out", str(out2), "train.steps=1"]) == 0
    saved = yaml.safe_load((out2 / "config.yaml").read_text())
    assert saved["method"]["adversarial"] is False and saved["train"]["steps"] == 1
    assert read_log(out2)[-1]["step"] == 1

    # bad input: exit status 2 and a message naming the problem
    assert main(["pretrain", "--study", str(tmp_path / "study.yaml"), "--model", "nope",
                 "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err


def test_separate_forward_gives_each_kind_of_view_its_own_batch_norm_batch(tiny_manifest):
    """attack.forward: separate runs clean and adversarial views through the encoder in two
    forwards (the reference code), so the loss is the sum of two single-kind forwards; joint
    normalises them as one batch, which changes the loss in train mode."""
    from hsat.losses import hierarchical_loss
    from hsat.methods import resolve_method
    from hsat.models import build_model
    from hsat.train import embed_views, encoder_update

    torch.manual_seed(0)
    shape = (2, 2, 2, 2)
    x = torch.rand(16, 3, 16, 16)
    x_adv = (x + 0.3 * torch.rand_like(x)).clamp(0, 1)
    method = resolve_method({"name": "hsat"})
    kw = dict(weights=method["level_weights"], temperature=method["temperature"], base_temperature=method["base_temperature"])
    losses = {}
    for mode in (True, False):
        torch.manual_seed(1)
        model = build_model("test_resnet", head_hidden=(16,), embed_dim=8).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        losses[mode] = encoder_update(model, opt, x, x_adv, shape, method=method, separate_forward=mode).loss
    torch.manual_seed(1)
    model = build_model("test_resnet", head_hidden=(16,), embed_dim=8).train()
    expected = sum(float(hierarchical_loss(embed_views(model, v, shape)[0], method["min_levels"], **kw)["total"].detach())
                   for v in (x, x_adv))
    assert losses[True] == pytest.approx(expected, rel=1e-5)
    assert abs(losses[True] - losses[False]) > 1e-4


def test_cli_pretrain_refuses_patches_smaller_than_the_crop_before_writing(tiny_manifest, tmp_path, capsys):
    """The embedded cohort's 32 px patches cannot hold a 48 px crop: exit 2 naming a file, no run dir."""
    from hsat.cli import main

    settings = ["data.image_size=48", "model.backbone=test_resnet", "model.head_hidden=[16]", "model.embed_dim=8",
                "train.steps=1", "data.num_workers=0", "data.patients_per_batch=4", "device=cpu"]
    out = tmp_path / "run"
    assert main(["pretrain", "--manifest", str(tiny_manifest), "--out", str(out), *settings]) == 2
    err = capsys.readouterr().err
    assert ".tif" in err and "smaller than the 48 px crop" in err and "data.resize" in err
    assert not out.exists()
    resized = tmp_path / "resized"  # the fix the message names
    assert main(["pretrain", "--manifest", str(tiny_manifest), "--out", str(resized), *settings, "data.resize={size: 48}"]) == 0
    assert (resized / "model.safetensors").is_file()


@pytest.mark.parametrize("output", ["logits", "embedding"])
def test_after_freezing_the_unused_head_every_trainable_parameter_gets_a_gradient(output):
    # DDP (find_unused_parameters=False) fails on the step after a parameter got no gradient.
    model = build_model("test_resnet", head_hidden=(16,), embed_dim=8, num_classes=3)
    freeze_unused_head(model, output)
    model(torch.rand(4, 3, 16, 16), output=output).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == ({"head"} if output == "logits" else {"classifier"})
