"""A trained encoder as a plain timm checkpoint: the backbone alone, with how to rebuild and feed it.

`export_encoder(run_dir, out)` writes OUT.safetensors holding the timm model's state dict (keys
exactly as `timm.create_model(name, num_classes=0, **model_kwargs)` names them; no projection
head, no normalisation buffers), with string metadata (safetensors metadata is str -> str):

    format          "pt"
    timm_model      the timm architecture name, e.g. "resnet50"
    model_kwargs    JSON: the constructor arguments hsat built it with, e.g. {"img_size": 32} for
                    a ViT trained on 32 px crops ({} for CNNs)
    pretrained_cfg  JSON: timm pretrained-cfg fields: mean, std (the normalisation the hsat model
                    applied inside itself), input_size [3, S, S] (the run's data.image_size),
                    crop_pct 1.0, crop_mode "center", interpolation "bilinear", num_classes 0
    hsat_version    the hsat version that exported it
    method          the run's method name (e.g. "hsat", "hidisc")

Loading needs timm only. timm reads tensors from the file and nothing else, so the
architecture, its arguments and the preprocessing cfg are passed in by the caller:

    import json, timm
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    cfg = json.loads(meta["pretrained_cfg"])
    model = timm.create_model(
        meta["timm_model"], pretrained=True, num_classes=0,
        pretrained_cfg_overlay=dict(cfg, file=path), **json.loads(meta["model_kwargs"]),
    ).eval()
    data_cfg = timm.data.resolve_data_config({}, model=model)  # this run's mean/std/input size

`pretrained_cfg_overlay={"file": path}` alone (with `num_classes=0` and the model kwargs) loads
the same weights without any network access, but then timm keeps the registry's cfg (ImageNet
mean/std, 224 px), which is not this encoder's, and loads non-strictly (num_classes differs from
the registry's 1000), so missing keys would only be logged; the cfg above carries num_classes 0
and makes the load strict.

Preprocessing: hsat models take images in [0, 1] and normalise inside; the timm model does not,
so feed it `(x - mean) / std` with `x` in [0, 1] (timm's transforms: ToTensor then Normalize(mean,
std)). Then `model(normalised)` equals `HSATModel.encode(x)`. hsat evaluates on a
center crop of data.image_size px at native resolution, resizing (bilinear, antialiased) only
images smaller than that; timm's eval transform resizes the short side to the crop first, which
changes the pixel scale of larger patches, so crop rather than resize them to match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hsat import __version__
from hsat.config import read_yaml
from hsat.errors import HSATError
from hsat.io import atomic_path
from hsat.methods import resolve_method
from hsat.models import load_trained_model

METADATA_KEYS = ("format", "timm_model", "model_kwargs", "pretrained_cfg", "hsat_version", "method")


def export_encoder(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write RUN_DIR's trained backbone as a timm-loadable safetensors file (see the module doc)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise HSATError(f"{out}: the exported encoder must be a .safetensors file (timm picks the reader by suffix)")
    if out.is_dir():
        raise HSATError(f"{out}: is a directory; give a file path ending in .safetensors")
    model = load_trained_model(run_dir)
    cfg = read_yaml(Path(run_dir) / "config.yaml")
    name, size = cfg["model"]["backbone"], int(cfg["data"]["image_size"])
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.backbone.state_dict().items()}
    model_kwargs = _model_kwargs(name, size, state, Path(run_dir))
    pretrained_cfg = {
        "mean": _floats(model.mean), "std": _floats(model.std),
        "input_size": [3, size, size], "test_input_size": [3, size, size],
        "crop_pct": 1.0, "test_crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear",
        "num_classes": 0,
    }
    metadata = {
        "format": "pt",
        "timm_model": name,
        "model_kwargs": json.dumps(model_kwargs),
        "pretrained_cfg": json.dumps(pretrained_cfg),
        "hsat_version": __version__,
        "method": resolve_method(cfg.get("method") or {})["name"],
    }
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return out


def encoder_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an exported encoder, JSON fields decoded (model_kwargs, pretrained_cfg)."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise HSATError(f"{path}: not a readable safetensors file: {exc}") from exc
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise HSATError(f"{path}: not an `hsat export` encoder (metadata lacks {', '.join(missing)})")
    return {**meta, "model_kwargs": json.loads(meta["model_kwargs"]),
            "pretrained_cfg": json.loads(meta["pretrained_cfg"])}


def _model_kwargs(name: str, image_size: int, state: dict[str, torch.Tensor], run_dir: Path) -> dict[str, Any]:
    """The kwargs hsat built the backbone with (img_size where timm takes it, as build_model does),
    checked by rebuilding the bare timm model on the meta device and comparing every tensor shape."""
    kwargs: dict[str, Any] = {"img_size": image_size}
    with torch.device("meta"):
        try:
            ref = timm.create_model(name, num_classes=0, **kwargs)
        except TypeError as exc:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(exc):
                raise
            kwargs = {}
            ref = timm.create_model(name, num_classes=0)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:5]
        raise HSATError(
            f"{run_dir}: the trained backbone does not match timm.create_model({name!r}, num_classes=0, "
            f"**{kwargs}) (e.g. {diff}); it cannot be exported as a plain timm checkpoint"
        )
    return kwargs


def _floats(t: torch.Tensor) -> list[float]:
    """Per-channel values of a (1, C, 1, 1) buffer, as short decimals (float32 precision)."""
    return [float(f"{v:.7g}") for v in t.flatten().tolist()]
