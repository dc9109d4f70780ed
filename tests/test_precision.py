"""Precision: what `auto` resolves to, bf16 crafting scored in fp32, and the sanity check that
catches an attack weakened by low precision."""

from __future__ import annotations

import pytest
import torch
from test_evaluate import ToyModel, toy_cfg
from test_sanity import hard_setup

import hsat.precision as precision_mod
from hsat.evaluate import sanity_checks
from hsat.evaluate.sweep import AttackSpec, run_attacks
from hsat.precision import autocast_factory, effective_precision

torch.set_num_threads(1)


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: True)
    assert effective_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    assert effective_precision("auto", "cpu") == "fp32"
    # explicit values are taken as they are
    assert effective_precision("bf16", "cpu") == "bf16"
    assert effective_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        effective_precision("fp16", "cpu")


def test_autocast_factory_runs_linear_layers_in_bf16():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast_factory("bf16", "cpu")():
        assert layer(x).dtype == torch.bfloat16
    with autocast_factory("fp32", "cpu")():
        assert layer(x).dtype == torch.float32


def test_bf16_crafting_is_scored_in_fp32():
    """The clean scores do not depend on the crafting precision; the attack still works in bf16."""
    model, probe, bank, val = hard_setup()
    spec = AttackSpec("pgd", 8.0, 6, "linear_ce", 2.0, 0)
    out = {p: run_attacks(model, probe, bank, val, [spec], ["linear"], 3, knn={"k": 10, "temperature": 0.07},
                          batch_size=64, progress=False, precision=p) for p in ("fp32", "bf16")}
    assert (out["fp32"].clean["linear"] == out["bf16"].clean["linear"]).all()
    y = out["fp32"].labels
    acc = {p: (r.adv[0]["linear"].argmax(1) == y).mean() for p, r in out.items()}
    clean = (out["fp32"].clean["linear"].argmax(1) == y).mean()
    assert acc["bf16"] < clean - 0.2 and abs(acc["bf16"] - acc["fp32"]) < 0.1


class MaskedInBf16(ToyModel):
    """Rounds its input to 1/255 under autocast only: a zero input gradient in bf16, honest in fp32."""

    def encode(self, x):
        if torch.is_autocast_enabled("cpu"):
            x = torch.round(x * 255) / 255
        return super().encode(x)


def _precision_rows(model, attack_precision):
    model, probe, bank, val = hard_setup(model)
    cfg = toy_cfg(eps=[8], steps=6)
    cfg.update(batch_size=128, attack_precision=attack_precision)
    cfg["sanity"] = {"steps": [1, 3, 6], "eps": [2, 8, 32], "restarts": 3, "large_eps": 64}
    df = sanity_checks(model, probe, bank, val, cfg, model_name="m", progress=False)
    return df[df["check"] == "precision"]


def test_precision_check_passes_when_bf16_attacks_as_well_as_fp32():
    rows = _precision_rows(ToyModel(), "bf16")
    assert set(rows["objective"]) == {"feature", "linear_ce", "knn_soft"}
    assert rows["passed"].all(), rows


def test_precision_check_fails_when_bf16_masks_the_gradient():
    rows = _precision_rows(MaskedInBf16(), "bf16")
    assert not rows["passed"].all(), rows
    assert not rows[rows["objective"] == "linear_ce"]["passed"].any()


def test_no_precision_rows_when_crafting_in_fp32():
    assert _precision_rows(ToyModel(), "fp32").empty


def test_pretrain_records_the_precision_it_used(tiny_manifest, tmp_path):
    """A bf16 run on the CPU trains (finite, falling loss is test_train's job) and says so. At 32 px
    no strided convolution of test_resnet sees a 1 x 1 input, so bf16 is safe on any CPU."""
    from test_train import read_log, tiny_cfg

    from hsat.train import load_checkpoint, pretrain

    for prec in ("bf16", "fp32"):
        cfg = tiny_cfg(tiny_manifest, precision=prec, data={"image_size": 32}, train={"steps": 2, "checkpoint_every": 2})
        out = pretrain(cfg, tmp_path / prec)
        assert load_checkpoint(out / "checkpoint.pt")["precision"] == prec
        assert all(torch.isfinite(torch.tensor(r["loss_total"])) for r in read_log(out))


def test_explicit_bf16_on_a_cpu_layer_it_computes_wrong_is_refused_before_the_run_starts(tiny_manifest, tmp_path):
    """test_resnet at 16 px feeds layer4's stride-2 convolution a 1 x 1 input: an explicit bf16 is
    refused by name, before the run folder is written; `auto` trains in fp32 and records it."""
    from test_train import tiny_cfg

    from hsat.errors import HSATError
    from hsat.train import load_checkpoint, pretrain

    with pytest.raises(HSATError, match=r"backbone\.layer4\.0\.conv1.*precision: auto"):
        pretrain(tiny_cfg(tiny_manifest, precision="bf16", train={"steps": 2}), tmp_path / "bf16")
    assert not (tmp_path / "bf16" / "config.yaml").exists()
    out = pretrain(tiny_cfg(tiny_manifest, precision="auto", train={"steps": 2, "checkpoint_every": 2}), tmp_path / "auto")
    assert load_checkpoint(out / "checkpoint.pt")["precision"] == "fp32"


def test_strided_convolutions_on_one_pixel_make_bf16_unsafe_on_the_cpu():
    """resnet10t at 16 px (DINO's local crops) feeds layer4's stride-2 convolution a 1 x 1 input,
    whose oneDNN bf16 weight gradient is garbage; at 32 px it sees 2 x 2 and bf16 stays."""
    from hsat.models import build_model
    from hsat.errors import HSATError
    from hsat.precision import safe_precision, strided_convs_on_single_pixels

    model = build_model("resnet10t", head_hidden=(16,), embed_dim=8, image_size=32)
    assert strided_convs_on_single_pixels(model, (32,)) == []
    bad = strided_convs_on_single_pixels(model, (32, 16))
    assert "backbone.layer4.0.conv1" in bad
    assert safe_precision("bf16", "auto", "cpu", model, (32, 16)) == ("fp32", bad)
    with pytest.raises(HSATError, match="backbone.layer4.0.conv1"):  # asked for: refused, by name
        safe_precision("bf16", "bf16", "cpu", model, (32, 16))
    assert safe_precision("bf16", "auto", "cpu", model, (32,)) == ("bf16", [])
    assert safe_precision("fp32", "auto", "cpu", model, (16,)) == ("fp32", [])
    assert model.training  # the dry forward leaves the mode as it was


def _fake_cuda(monkeypatch, native: bool):
    """A CUDA device as torch would report it, on a CPU-only machine: bf16 native (compute
    capability >= 8) or only emulated (torch's is_bf16_supported() says yes unless emulation is excluded)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)


def test_auto_picks_bf16_on_a_gpu_only_where_it_is_native(monkeypatch):
    _fake_cuda(monkeypatch, native=False)  # e.g. a V100 or T4: bf16 emulated, slower than fp32
    assert not precision_mod.native_bf16("cuda") and effective_precision("auto", "cuda") == "fp32"
    _fake_cuda(monkeypatch, native=True)  # A100, H100
    assert precision_mod.native_bf16("cuda") and effective_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not precision_mod.native_bf16("cuda")


@pytest.fixture
def tf32_on():
    """TF32 allowed for matmuls and cuDNN (the flags are process-wide: put back after the test)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_exact_fp32_turns_tf32_off_and_restores_it(tf32_on):
    """TF32 on: PyTorch's default for cuDNN convolutions; a user may enable it for matmuls too."""
    from hsat.precision import exact_fp32

    with exact_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError, match="boom"), exact_fp32():
        raise RuntimeError("boom")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("attack", ["pgd", "autoattack"])
def test_crafting_gradient_passes_run_without_tf32(monkeypatch, tf32_on, attack):
    """Every forward/backward pass of an attack sees TF32 off; the setting is back after it."""
    from hsat.evaluate.sweep import craft_batch

    model, probe, bank, val = hard_setup()
    seen = []
    encode = model.encode

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return encode(*args, **kwargs)

    monkeypatch.setattr(model, "encode", spy)
    x = torch.stack([val[i]["image"] for i in range(8)])
    y = torch.tensor([int(val[i]["label"]) for i in range(8)])
    spec = AttackSpec(attack, 8.0, 2, "linear_ce", 2.0, 0, version="apgd-ce+apgd-t") if attack == "autoattack" \
        else AttackSpec(attack, 8.0, 2, "linear_ce", 2.0, 0)
    with torch.no_grad():
        f_clean = model.encode(x)
    seen.clear()
    craft_batch(model, probe, x, y, spec, f_clean)
    assert seen and all(flags == (False, False) for flags in seen)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
