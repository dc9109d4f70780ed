"""Black-box transfer: craft an adversarial validation set once per surrogate, store it losslessly,
and evaluate exactly those tensors on every target model.

The stored file (safetensors) holds float32 images — never re-quantised to 8 bits, which would
move examples off the attack's optimum and off the eps-ball boundary — plus the labels, the
positions of the patches in the validation split, and in its metadata the attack settings and
the patches' paths (as the manifest stores them, relative to its folder), patients and slides,
so a target can check that the file describes its own validation set before trusting any
number -- wherever the study folder has moved since.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hsat.config import resolve_evaluation
from hsat.data.manifest import same_patch, stored_paths
from hsat.errors import HSATError
from hsat.evaluate import (
    AttackSpec,
    Embeddings,
    LinearProbe,
    attack_name,
    attack_subset,
    attacked_positions,
    classify,
    default_device,
    eval_image_size,
    level_metrics,
    load_embeddings,
    load_for_eval,
    patch_accuracy,
    run_attacks,
    sweep_alpha,
)
from hsat.evaluate.sanity import check_whitebox_vs_transfer as whitebox_vs_transfer  # noqa: F401 (public name)
from hsat.io import atomic_path, write_csv
from hsat.models import load_trained_model
from hsat.precision import effective_precision

log = logging.getLogger(__name__)

FORMAT = "hsat-adversarial-v1"
METADATA_KEY = "hsat"
"""The stored set's one metadata key: settings, paths, patients and slides as key-sorted JSON."""
TRANSFER_COLUMNS: tuple[str, ...] = (
    "surrogate", "target", "attack", "eps", "steps", "objective", "classifier",
    "level", "acc", "mca", "clean_acc", "clean_mca", "acc_drop", "mca_drop",
)


def craft(
    model: nn.Module,
    probe: LinearProbe,
    bank: tuple[torch.Tensor, torch.Tensor],
    val_dataset: Dataset,
    cfg_transfer: Mapping[str, Any],
    *,
    alpha: float = 2.0,
    knn: Mapping[str, Any] | None = None,
    indices: Sequence[int] | None = None,
    max_val_patches: int | None = None,
    surrogate: str = "",
    classes: Sequence[str] = (),
    image_size: int | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    attack_seed: int = 0,
    progress: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Adversarial validation set of one surrogate under `evaluation.transfer` (eps, alpha in 1/255;
    missing keys, and `knn` when None, take the schema's defaults).

    Returns {"images": (N, C, H, W) float32 CPU, "labels", "positions" (int64, positions in the
    validation split), "paths", "patients", "slides", "metadata": {...}}.
    """
    resolved = resolve_evaluation({"transfer": dict(cfg_transfer), **({"knn": dict(knn)} if knn else {})})
    cfg_transfer, knn = resolved["transfer"], resolved["knn"]
    if indices is None and max_val_patches:
        indices = attack_subset(val_dataset, {"max_val_patches": max_val_patches}, seed=attack_seed)
    # BIM and MI-FGSM under a label-free objective start at random, as in the white-box sweep
    spec = AttackSpec(attack_name(cfg_transfer["attack"], cfg_transfer["objective"]), float(cfg_transfer["eps"]),
                      int(cfg_transfer["steps"]), cfg_transfer["objective"], float(alpha), attack_seed)
    classifier = cfg_transfer["classifier"]
    kept: list[torch.Tensor] = []
    res = run_attacks(model, probe, bank, val_dataset, [spec], [classifier], probe.num_classes, knn=knn,
                      indices=indices, batch_size=batch_size, device=device, progress=progress,
                      desc=f"craft {surrogate}".strip(), keep=lambda i, x: kept.append(x.float().cpu()),
                      precision=precision)
    images = torch.cat(kept).contiguous()
    meta = {
        "format": FORMAT,
        "surrogate": surrogate,
        "attack": spec.attack,
        "eps": spec.eps,
        "alpha": spec.alpha,
        "steps": spec.steps,
        "objective": spec.objective,
        "random_start": spec.random_start,
        "precision": effective_precision(precision, device),
        "seed": attack_seed,
        "classifier": classifier,
        "image_size": int(image_size if image_size is not None else images.shape[-1]),
        "classes": list(classes),
        "surrogate_clean_acc": patch_accuracy(res.clean[classifier], res.labels),
        "surrogate_adv_acc": patch_accuracy(res.adv[0][classifier], res.labels),
    }
    return {
        "images": images,
        "labels": torch.as_tensor(res.labels, dtype=torch.int64),
        "positions": torch.as_tensor(res.positions, dtype=torch.int64),
        "paths": res.paths,
        "patients": res.patients,
        "slides": res.slides,
        "metadata": meta,
    }


def save_adversarial(path: str | Path, crafted: Mapping[str, Any]) -> Path:
    """Write a `craft` result as safetensors (float32 images; lists and settings in metadata)."""
    images = crafted["images"]
    if images.dtype != torch.float32:
        raise HSATError(f"adversarial images must be float32 to stay lossless, got {images.dtype}")
    tensors = {"images": images.contiguous(), "labels": crafted["labels"].long().contiguous(),
               "positions": crafted["positions"].long().contiguous()}
    metadata = dict(crafted["metadata"])
    for key in ("paths", "patients", "slides"):
        metadata[key] = list(crafted[key])
    with atomic_path(path, suffix=".safetensors") as tmp:
        # One key: safetensors writes several in a random order, and the file's bytes would vary.
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return Path(path)


def load_adversarial(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise HSATError(f"adversarial file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise HSATError(f"{path}: not a readable safetensors file: {exc}") from exc
    try:
        # one JSON object, or (a file written before) one JSON value per key
        meta = json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else {k: json.loads(v) for k, v in raw.items()}
    except ValueError as exc:
        raise HSATError(f"{path}: metadata is not JSON ({exc})") from exc
    if meta.get("format") != FORMAT or not {"images", "labels", "positions"} <= set(tensors):
        raise HSATError(f"{path}: not an hsat adversarial set (write it with `hsat transfer craft`)")
    lists = {k: meta.pop(k) for k in ("paths", "patients", "slides")}
    return {**tensors, **lists, "metadata": meta}


def _check_matches(adv: Mapping[str, Any], emb: Embeddings, source: str, target: str) -> None:
    """Refuse a stored set that does not describe the target's validation patches."""
    meta = adv["metadata"]
    if meta.get("classes") and emb.classes and list(meta["classes"]) != emb.classes:
        raise HSATError(f"{source}: classes {meta['classes']} differ from target {target}'s {emb.classes}")
    size = emb.meta.get("image_size")
    if size is not None and int(size) != int(meta.get("image_size", size)) or (
        size is not None and adv["images"].shape[-1] != int(size)
    ):
        raise HSATError(f"{source}: images of size {tuple(adv['images'].shape[-2:])} but target {target} "
                        f"is evaluated at {size} px; craft and evaluate at the same evaluation.image_size")
    val = emb.val_index
    pos = adv["positions"].numpy()
    if len(pos) and (pos.min() < 0 or pos.max() >= len(val)):
        raise HSATError(f"{source}: positions beyond target {target}'s {len(val)} validation patches")
    want = val["path"].to_numpy()[pos]
    bad = [i for i, (a, b) in enumerate(zip(adv["paths"], want)) if not same_patch(a, b)]
    if bad:
        i = bad[0]
        raise HSATError(f"{source}: patch {i} is {adv['paths'][i]} but target {target}'s validation patch "
                        f"{pos[i]} is {want[i]} ({len(bad)} mismatches); both must come from the same manifest")
    if not np.array_equal(emb.val_labels.numpy()[pos], adv["labels"].numpy()):
        raise HSATError(f"{source}: labels differ from target {target}'s validation labels")


@torch.no_grad()
def evaluate_transfer(
    adv_file: str | Path,
    target_model: nn.Module,
    target_embeddings: Embeddings,
    cfg_eval: Mapping[str, Any],
    *,
    surrogate: str = "",
    target: str = "",
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Score the stored adversarial tensors, unchanged, with the target's classifier at every level.

    The target's clean numbers come from its own clean validation features (`hsat embed`) of
    the same patches; acc_drop = clean_acc - acc and mca_drop likewise (the paper's Acc-D/MCA-D).
    """
    adv = load_adversarial(adv_file)
    _check_matches(adv, target_embeddings, str(adv_file), target or "target")
    meta = adv["metadata"]
    cfg_eval = resolve_evaluation(cfg_eval)
    classifier = cfg_eval["transfer"]["classifier"]
    bs = int(batch_size or cfg_eval["batch_size"])
    probe = target_embeddings.probe.to(device)
    bank = tuple(t.to(device) for t in target_embeddings.bank)
    num_classes = probe.num_classes
    knn = cfg_eval["knn"]
    was_training = target_model.training
    target_model.eval()
    try:
        adv_scores = []
        images = adv["images"]
        for start in tqdm(range(0, images.shape[0], bs), desc=f"transfer score {surrogate or ''}".strip(),
                          leave=False):  # tqdm's ETA in the log
            f = target_model.encode(images[start : start + bs].to(device))
            adv_scores.append(classify(f, probe, bank, [classifier], num_classes, knn)[classifier])
    finally:
        target_model.train(was_training)
    pos = adv["positions"]
    clean_f = target_embeddings.val_features[pos].to(device)
    clean_scores = classify(clean_f, probe, bank, [classifier], num_classes, knn)[classifier]
    labels = adv["labels"].numpy()
    adv_m = level_metrics(torch.cat(adv_scores), labels, adv["patients"], adv["slides"], num_classes)
    clean_m = level_metrics(clean_scores, labels, adv["patients"], adv["slides"], num_classes)
    rows = []
    for level in adv_m:
        a, c = adv_m[level], clean_m[level]
        rows.append({"surrogate": surrogate or meta.get("surrogate", ""), "target": target, "attack": meta["attack"],
                     "eps": meta["eps"], "steps": meta["steps"], "objective": meta["objective"], "classifier": classifier,
                     "level": level, "acc": a["acc"], "mca": a["mca"], "clean_acc": c["acc"], "clean_mca": c["mca"],
                     "acc_drop": c["acc"] - a["acc"], "mca_drop": c["mca"] - a["mca"]})
    return pd.DataFrame(rows, columns=list(TRANSFER_COLUMNS))


# ----------------------------------------------------------------------------- study-level entry points


def craft_run(run_dir, manifest, emb_dir, study: Mapping[str, Any], out, device=None, progress: bool = True) -> Path:
    """`hsat transfer craft`: the surrogate's adversarial validation set, written to `out`."""
    device = torch.device(device) if device else default_device()
    model, emb, val_ds = load_for_eval(run_dir, manifest, emb_dir, study, device)
    cfg_eval = resolve_evaluation(study["evaluation"])
    tr = cfg_eval["transfer"]
    crafted = craft(model, emb.probe, emb.bank, val_ds, tr, alpha=sweep_alpha(cfg_eval["whitebox"], tr["eps"], tr["steps"]),
                    knn=cfg_eval["knn"], indices=attacked_positions(emb, cfg_eval), surrogate=Path(run_dir).name,
                    classes=emb.classes, image_size=eval_image_size(study, run_dir),
                    batch_size=cfg_eval["batch_size"], device=device, progress=progress,
                    precision=cfg_eval["attack_precision"])
    crafted["paths"] = stored_paths(crafted["paths"], manifest)  # as index.csv names them
    return save_adversarial(out, crafted)


def transfer_run(adv_files, surrogates, target: str, target_run, target_emb, study: Mapping[str, Any], out,
                 device=None) -> pd.DataFrame:
    """`hsat transfer evaluate`: the target's cells of the transfer matrix -- one per surrogate's
    stored set (`adv_files` and `surrogates` in the same order; one of each also works) -- with the
    target model loaded once, written to `out`."""
    adv_files = [adv_files] if isinstance(adv_files, (str, Path)) else list(adv_files)
    surrogates = [surrogates] if isinstance(surrogates, str) else list(surrogates)
    if len(adv_files) != len(surrogates):
        raise HSATError(f"{len(adv_files)} adversarial file(s) but {len(surrogates)} surrogate name(s): "
                        "give one --surrogate per --adversarial, in the same order")
    device = torch.device(device) if device else default_device()
    emb = load_embeddings(target_emb)
    model = load_trained_model(target_run, device=device, fold_bn=True)
    frames = [evaluate_transfer(adv, model, emb, study["evaluation"], surrogate=s, target=target, device=device)
              for adv, s in zip(adv_files, surrogates)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(TRANSFER_COLUMNS))
    write_csv(out, df)
    return df
