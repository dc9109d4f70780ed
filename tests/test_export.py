"""`hsat export`: a trained backbone loads with plain timm and gives the hsat model's features."""

from __future__ import annotations

import json
import socket

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hsat import __version__
from hsat.cli import main
from hsat.config import validate
from hsat.errors import HSATError
from hsat.export import encoder_metadata, export_encoder
from hsat.io import write_yaml
from hsat.methods import resolve_method
from hsat.models import load_trained_model, model_from_config, save_weights


@pytest.fixture
def offline(monkeypatch):
    """Loading must not reach the network: the hub is offline and any connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def make_run(run_dir, backbone: str, image_size: int, method: str = "hsat"):
    """A finished-run directory: the resolved config and trained (here: randomly moved) weights."""
    torch.manual_seed(0)
    cfg = validate({"model": {"backbone": backbone, "head_hidden": [16], "embed_dim": 8},
                    "data": {"image_size": image_size}, "method": {"name": method}}, "run")
    cfg["method"] = resolve_method(cfg["method"])
    model = model_from_config(cfg)
    with torch.no_grad():  # move BN running statistics off their defaults so they are checked too
        model(torch.rand(4, 3, image_size, image_size))
    write_yaml(run_dir / "config.yaml", cfg)
    save_weights(model, run_dir / "model.safetensors")
    return run_dir


def load_with_timm(path):
    """The loading code of hsat.export's docstring, as a user would type it."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["pretrained_cfg"])
    return timm.create_model(
        meta["timm_model"], pretrained=True, num_classes=0,
        pretrained_cfg_overlay=dict(cfg, file=str(path)), **json.loads(meta["model_kwargs"]),
    ).eval()


@pytest.mark.parametrize(
    "backbone,image_size,kwargs",
    [("test_resnet", 32, {}), ("resnet10t", 48, {}), ("vit_tiny_patch16_224", 32, {"img_size": 32})],
)
def test_exported_backbone_loads_with_timm_and_matches(tmp_path, offline, backbone, image_size, kwargs):
    run = make_run(tmp_path / "run", backbone, image_size, method="hidisc")
    out = export_encoder(run, tmp_path / "encoder.safetensors")
    hsat_model = load_trained_model(run)

    # Backbone only, keys as timm names them: no head, no normalisation buffers, no prefix.
    state = load_file(str(out))
    assert set(state) == set(timm.create_model(backbone, num_classes=0, **kwargs).state_dict())
    for key, value in hsat_model.backbone.state_dict().items():
        torch.testing.assert_close(state[key], value, msg=key)

    meta = encoder_metadata(out)
    assert meta["timm_model"] == backbone and meta["model_kwargs"] == kwargs
    assert meta["method"] == "hidisc" and meta["hsat_version"] == __version__ and meta["format"] == "pt"
    cfg = meta["pretrained_cfg"]
    torch.testing.assert_close(torch.tensor(cfg["mean"]), hsat_model.mean.flatten())
    torch.testing.assert_close(torch.tensor(cfg["std"]), hsat_model.std.flatten())
    assert cfg["input_size"] == [3, image_size, image_size] and cfg["num_classes"] == 0

    # The exact call of the issue: plain timm, the file as the pretrained source, no network.
    plain = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(out)},
                              num_classes=0, **kwargs).eval()
    # The documented call also carries the cfg, so timm's data config is this encoder's.
    documented = load_with_timm(out)
    data_cfg = timm.data.resolve_data_config({}, model=documented)
    assert tuple(data_cfg["input_size"]) == (3, image_size, image_size)
    assert data_cfg["crop_pct"] == 1.0
    mean = torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_cfg["std"]).view(1, 3, 1, 1)

    x = torch.rand(3, 3, image_size, image_size)  # [0, 1] pixels, as hsat models take them
    with torch.no_grad():
        expected = hsat_model.encode(x)
        for net in (plain, documented):
            torch.testing.assert_close(net((x - mean) / std), expected, rtol=1e-4, atol=1e-5)
        # Unnormalised input is not what the timm model expects.
        assert not torch.allclose(documented(x), expected, atol=1e-3)


def test_cli_export_creates_missing_folders(tmp_path, capsys):
    run = make_run(tmp_path / "run", "test_resnet", 32)
    out = tmp_path / "new" / "folder" / "enc.safetensors"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    assert out.is_file() and "test_resnet" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["enc.safetensors"]  # no temp file left behind
    assert encoder_metadata(out)["method"] == "hsat"


def test_cli_run_without_weights_exits_2_and_writes_nothing(tmp_path, capsys):
    run = make_run(tmp_path / "run", "test_resnet", 32)
    (run / "model.safetensors").unlink()
    out = tmp_path / "out" / "enc.safetensors"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "model.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_cli_bad_out_paths_exit_2(tmp_path, capsys):
    run = make_run(tmp_path / "run", "test_resnet", 32)
    for bad in (tmp_path / "enc.pth", tmp_path / "adir.safetensors"):
        if bad.suffix == ".safetensors":
            bad.mkdir()
        assert main(["export", "--run", str(run), "--out", str(bad)]) == 2
        assert str(bad) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir.safetensors", "run"]
    assert not any((tmp_path / "adir.safetensors").iterdir())


def test_metadata_of_other_files_is_refused(tmp_path):
    run = make_run(tmp_path / "run", "test_resnet", 32)
    with pytest.raises(HSATError, match="not an `hsat export` encoder"):
        encoder_metadata(run / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(HSATError, match="junk.safetensors"):
        encoder_metadata(tmp_path / "junk.safetensors")
