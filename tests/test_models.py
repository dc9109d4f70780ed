"""Encoder construction, local-only ImageNet initialisation, and weights round trip."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from hsat.config import validate
from hsat.errors import HSATError
from hsat.io import write_yaml
from hsat.models import HSATModel, build_model, load_trained_model, model_from_config, save_weights


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of hanging or downloading."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def test_forward_shapes_and_normalised_embedding():
    torch.manual_seed(0)
    model = build_model("test_resnet", head_hidden=(32, 16), embed_dim=8).eval()
    assert isinstance(model, HSATModel)
    x = torch.rand(3, 3, 32, 32)
    f = model.encode(x)
    assert f.shape == (3, model.num_features)
    z = model(x)
    assert z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(z, model.project(f))
    # Head: Linear -> ReLU per hidden width, then Linear to the embedding.
    linears = [m for m in model.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(model.num_features, 32), (32, 16), (16, 8)]


def test_normalisation_lives_inside_the_model():
    torch.manual_seed(0)
    model = build_model("resnet10t", head_hidden=(), embed_dim=4).eval()
    cfg = model.backbone.pretrained_cfg
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(cfg["mean"], dtype=torch.float32))
    x = torch.rand(2, 3, 32, 32)
    expected = model.backbone((x - model.mean) / model.std)
    torch.testing.assert_close(model.encode(x), expected)
    # Unnormalised input would give different features: the model does not expect pre-normalised data.
    assert not torch.allclose(model.encode(x), model.backbone(x))


def test_vit_backbone_at_small_image_size():
    model = build_model("test_vit", head_hidden=(16,), embed_dim=8, image_size=32).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 8)


@pytest.mark.parametrize(
    "name,image_size,features",
    [("resnet50", 32, 2048), ("wide_resnet50_2", 32, 2048), ("resnet101", 32, 2048), ("vit_small_patch16_224", 32, 384)],
)
def test_paper_backbones_construct(name, image_size, features):
    # Meta device: shapes only, no memory or compute, so the big models cost milliseconds.
    with torch.device("meta"):
        model = build_model(name, image_size=image_size)
        out = model(torch.rand(2, 3, image_size, image_size))
    assert model.num_features == features
    assert out.shape == (2, 128)


def test_unknown_backbone_suggests_names():
    with pytest.raises(HSATError, match="resnet50"):
        build_model("resnet5O")


def test_pretrained_missing_fails_fast_without_network(no_network, empty_caches):
    start = time.monotonic()
    with pytest.raises(HSATError) as info:
        build_model("test_resnet", pretrained=True)
    assert time.monotonic() - start < 10
    msg = str(info.value)
    assert str(empty_caches / "hf" / "hub") in msg
    assert "models--timm--test_resnet" in msg
    assert "pretrained_path" in msg


def _reference_backbone_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(name).state_dict()  # with classifier, as released checkpoints are


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_from_local_file(tmp_path, no_network, empty_caches, suffix):
    state = _reference_backbone_state("test_resnet", seed=1)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(2)
    model = build_model("test_resnet", pretrained_path=path)
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_vit_pretrained_file_at_another_image_size(tmp_path):
    # Released ViT weights are for 160/224 px; position embeddings are resampled for 32 px crops.
    state = _reference_backbone_state("test_vit", seed=4)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = build_model("test_vit", pretrained_path=path, image_size=32, head_hidden=(8,), embed_dim=4)
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert model.backbone.pos_embed.shape[1] < state["pos_embed"].shape[1]
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 4)


def test_pretrained_path_missing_or_not_weights(tmp_path):
    with pytest.raises(HSATError, match="not found"):
        build_model("test_resnet", pretrained_path=tmp_path / "nope.safetensors")
    bad = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(bad))
    with pytest.raises(HSATError, match="other.safetensors"):
        build_model("test_resnet", pretrained_path=bad)


def test_pickled_code_in_pth_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("x")}, path)  # arbitrary class
    with pytest.raises(HSATError, match="evil.pth"):
        build_model("test_resnet", pretrained_path=path)


def test_pretrained_from_hugging_face_cache(no_network, empty_caches):
    """A file already in the HF cache layout is used, with no network."""
    repo = timm.models.get_pretrained_cfg("test_resnet").hf_hub_id
    commit = "0" * 40
    base = empty_caches / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    state = _reference_backbone_state("test_resnet", seed=3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    model = build_model("test_resnet", pretrained=True)
    torch.testing.assert_close(model.backbone.conv1[0].weight, state["conv1.0.weight"])


def _run_config(**model) -> dict:
    return validate({"model": {"backbone": "test_resnet", "head_hidden": [16], "embed_dim": 8, **model}, "data": {"image_size": 32}}, "run")


def test_model_from_config_uses_model_and_image_size():
    cfg = validate({"model": {"backbone": "test_vit", "head_hidden": [24], "embed_dim": 6}, "data": {"image_size": 48}}, "run")
    model = model_from_config(cfg)
    assert model.head[0].out_features == 24 and model.embed_dim == 6
    assert model.eval()(torch.rand(1, 3, 48, 48)).shape == (1, 6)


class _DDPLike(torch.nn.Module):
    """Stands in for DistributedDataParallel's `module.` key prefix (real DDP needs a process group)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap", ["plain", "compile", "ddp_like"])
def test_save_and_load_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    cfg = _run_config()
    model = model_from_config(cfg)
    with torch.no_grad():  # move BN statistics away from their defaults so they are checked too
        model(torch.rand(4, 3, 32, 32))
    model.eval()
    wrapped = {"plain": model, "compile": torch.compile(model), "ddp_like": _DDPLike(model)}[wrap]
    if wrap == "ddp_like":
        assert all(k.startswith("module.") for k in wrapped.state_dict())
    write_yaml(tmp_path / "config.yaml", cfg)
    save_weights(wrapped, tmp_path / "model.safetensors")
    assert not list(tmp_path.glob(".model.safetensors*"))  # no temp file left behind
    loaded = load_trained_model(tmp_path)
    assert not loaded.training
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_load_trained_model_never_fetches_pretrained(tmp_path, no_network, empty_caches):
    cfg = _run_config(pretrained=True)  # the run was initialised from ImageNet; loading must not need it
    write_yaml(tmp_path / "config.yaml", cfg)
    save_weights(model_from_config(_run_config()), tmp_path / "model.safetensors")
    assert isinstance(load_trained_model(tmp_path), HSATModel)


def test_load_trained_model_errors(tmp_path):
    with pytest.raises(HSATError, match="config.yaml"):
        load_trained_model(tmp_path)
    write_yaml(tmp_path / "config.yaml", _run_config())
    with pytest.raises(HSATError, match="model.safetensors"):
        load_trained_model(tmp_path)
    # Weights of a different head do not match the config.
    save_weights(model_from_config(_run_config(head_hidden=[32])), tmp_path / "model.safetensors")
    with pytest.raises(HSATError, match="does not match"):
        load_trained_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HSATError, match="safetensors"):
        load_trained_model(tmp_path)


def test_embedding_changes_with_input():
    model = build_model("test_resnet", head_hidden=(8,), embed_dim=4).eval()
    a, b = model(torch.zeros(1, 3, 32, 32)), model(torch.ones(1, 3, 32, 32))
    assert F.cosine_similarity(a, b).item() < 1 - 1e-6


def test_folded_batch_norm_is_the_same_function_and_gradient():
    """Evaluation folds batch norm into the convolutions: same features and input gradients."""
    import copy

    from hsat.models import fold_batch_norm

    torch.manual_seed(0)
    model = build_model("test_resnet", head_hidden=(16,), embed_dim=8)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model.encode(torch.rand(8, 3, 16, 16))
    model.eval()
    folded = fold_batch_norm(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.backbone.modules())
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    g1, = torch.autograd.grad(model.encode(x).sum(), x)
    g2, = torch.autograd.grad(folded.encode(x).sum(), x)
    assert torch.allclose(model(x), folded(x), atol=1e-5)
    assert torch.allclose(g1, g2, atol=1e-5)
    # A model still training is left alone (folding freezes the statistics).
    training = build_model("test_resnet", head_hidden=(16,), embed_dim=8)
    assert fold_batch_norm(training).backbone is training.backbone


def test_attention_kernel_choice_is_the_same_function_and_gradient():
    """The unfused attention picked for CPU bf16 computes what the fused kernel does."""
    import copy

    from hsat.models import choose_attention_kernel

    torch.manual_seed(0)
    fused = build_model("test_vit", head_hidden=(16,), embed_dim=8, image_size=32).eval()
    explicit = copy.deepcopy(fused)
    assert choose_attention_kernel(fused, "cpu", "fp32") > 0
    n = choose_attention_kernel(explicit, "cpu", "bf16")
    attn = [m for m in explicit.modules() if hasattr(m, "fused_attn")]
    assert n == len(attn) > 0 and not any(m.fused_attn for m in attn)
    assert all(m.fused_attn for m in fused.modules() if hasattr(m, "fused_attn"))
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    g1, = torch.autograd.grad(fused.encode(x).sum(), x)
    g2, = torch.autograd.grad(explicit.encode(x).sum(), x)
    assert torch.allclose(fused.encode(x), explicit.encode(x), atol=1e-5)
    assert torch.allclose(g1, g2, atol=1e-5)
    assert choose_attention_kernel(build_model("test_resnet", head_hidden=(16,), embed_dim=8), "cpu", "bf16") == 0
