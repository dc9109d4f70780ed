"""Encoders the study did not train (a foundation model, your own checkpoint) as run directories.

A model entry with `method: {name: pretrained}` is not trained: `import_encoder` reads its weights
(`model.pretrained_path`: safetensors, or a torch file read with `weights_only=True`, so no pickled
code runs) into the timm backbone `model.backbone`, or builds it with the user's own code
(`model.factory`), and writes the run directory `hsat pretrain` would write (config.yaml,
model.safetensors, code.version). Every evaluation stage reads that directory as any finished
run, so the encoder goes through the same protocol as the trained ones.

What the evaluation sees is the backbone's pooled output (timm's `num_classes=0`, the CLS token
or the average pool as `backbone_args.global_pool` says), after the encoder's own input
normalisation (`model.mean` / `model.std`, resolved into config.yaml) at `data.image_size`.
The projection head a trained run carries is present but untrained (seeded by `seed`): it only
serves the `head` attack objective. Nothing is downloaded: timm builds the architecture with
`pretrained=False` and the weights come from the local file.

Robust fine-tuning starts a trained method from such a run (`init_from`, any finished run in
fact): `init_weights` pins the source file by its hash in the run's config, and
`load_init_backbone` copies its backbone into the model before the first step, strictly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hsat.config import validate
from hsat.errors import HSATError
from hsat.io import remove_temporaries, write_text, write_yaml
from hsat.methods import resolve_method, trains_encoder
from hsat.models import HSATModel, clean_state_dict, model_from_config, save_weights

log = logging.getLogger(__name__)

CONFIG, WEIGHTS, CODE_STAMP = "config.yaml", "model.safetensors", "code.version"
TRAINING_FILES = ("checkpoint.pt", "log.jsonl")
"""What a training run leaves in its directory; an imported encoder replacing one drops them (a
stale training curve would otherwise be drawn for it)."""


def _short(values: torch.Tensor) -> list[float]:
    """Buffer values as the short decimals a config shows (0.485, not 0.48500001430511475)."""
    return [float(f"{float(v):.7g}") for v in values.flatten()]


def import_encoder(cfg: Mapping[str, Any], out_dir: str | os.PathLike, *, code_version: str | None = None) -> Path:
    """Write the run directory of a `pretrained` model entry: its weights read, nothing trained.

    The whole model is built (weights read and checked against the architecture) before anything
    is written, so a refused file leaves the directory as it was. Returns `out_dir`.
    """
    cfg = validate(cfg, "run")
    cfg["method"] = resolve_method(cfg["method"])
    cfg = json.loads(json.dumps(cfg))  # plain containers, as config.yaml holds them
    if trains_encoder(cfg["method"]):
        raise HSATError(f"method {cfg['method']['name']!r} trains its encoder: hsat pretrain trains it "
                        "(import_encoder is for method pretrained)")
    m = cfg["model"]
    if not (m.get("pretrained_path") or m.get("factory") or m.get("pretrained")):
        raise HSATError("method pretrained: set model.pretrained_path (a local weights file), model.factory "
                        "(your own code that builds the encoder) or model.pretrained (timm weights already in "
                        "the local cache); without them the encoder would be randomly initialised")
    if m.get("num_classes"):
        raise HSATError("method pretrained: model.num_classes must be null (an imported encoder has no "
                        "trained classification head)")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))  # the untrained projection head, reproducibly
        model = model_from_config(cfg).eval()
    # The preprocessing the encoder applies travels with the run, spelled out.
    m["mean"], m["std"] = _short(model.mean), _short(model.std)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS, CODE_STAMP, *TRAINING_FILES):
        remove_temporaries(out_dir / name)
    (out_dir / WEIGHTS).unlink(missing_ok=True)  # written last: its presence marks a finished run
    for name in TRAINING_FILES:
        (out_dir / name).unlink(missing_ok=True)
    write_yaml(out_dir / CONFIG, cfg)
    if code_version:
        write_text(out_dir / CODE_STAMP, code_version + "\n")
    save_weights(model, out_dir / WEIGHTS)
    source = m.get("factory") or m.get("backbone")
    log.info("%s: imported %s (%s), %d features, no training", out_dir, source,
             m.get("pretrained_path") or "weights of the factory", model.num_features)
    return out_dir


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def init_weights(cfg: dict[str, Any]) -> Path | None:
    """The weights file a fine-tuning run starts from (`init_from.run`/model.safetensors), None
    without `init_from`. Records the file's sha256 in `cfg["init_from"]`, so the run's config.yaml
    names the exact source and a changed source counts as a changed config (the run retrains
    instead of resuming); a hash already set must match."""
    init = cfg.get("init_from")
    if not init:
        return None
    weights = Path(init["run"]) / WEIGHTS
    if not weights.is_file():
        source = f"model {init['model']!r}" if init.get("model") else "that run"
        raise HSATError(f"init_from.run: {weights} not found (train or import {source} first)")
    digest = file_sha256(weights)
    if init.get("sha256") and init["sha256"] != digest:
        raise HSATError(f"init_from.sha256: {weights} has sha256 {digest}, not the {init['sha256']} the config pins")
    init["sha256"] = digest
    return weights


def load_init_backbone(model: HSATModel, path: str | os.PathLike) -> None:
    """Copy the backbone of a finished run's model.safetensors into `model`'s backbone.

    safetensors only (no code runs); every backbone tensor must be there with the same shape and
    none may be left over, else HSATError naming the file. The heads stay as built: a fine-tuned
    method trains its own.
    """
    path = Path(path)
    try:
        state = clean_state_dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError) as exc:
        raise HSATError(f"init_from: {path}: not a readable safetensors file: {exc}") from exc
    source = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(source))
    extra = sorted(set(source) - set(own))
    shapes = [f"{k} {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in source and source[k].shape != v.shape]
    if missing or extra or shapes:
        problems = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                    f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})" if extra else "",
                    f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:3])})" if shapes else ""]
        raise HSATError(f"init_from: {path} does not fit this model's backbone: backbone tensors "
                        f"{', '.join(p for p in problems if p)} (set the same model.backbone, backbone_args "
                        "and data.image_size as the source, or leave them to be inherited)")
    model.backbone.load_state_dict(source, strict=True)
    for name in ("mean", "std"):
        if name in state and not torch.equal(state[name].view(-1), getattr(model, name).view(-1).cpu()):
            log.warning("init_from %s: model.%s %s differs from the source's %s", path, name,
                        _short(getattr(model, name)), _short(state[name]))


__all__ = ["file_sha256", "import_encoder", "init_weights", "load_init_backbone"]
