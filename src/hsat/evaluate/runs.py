"""The entry points the CLI calls (`hsat embed | evaluate | sanity`, the study's sanity report)
and the loading they share. Each takes a validated study config and writes one result file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch.utils.data import Dataset

from hsat import attacks
from hsat.config import read_yaml, resolve_evaluation, run_config_for_model, validate
from hsat.data.manifest import class_names, label_ids, read_manifest, stored_paths
from hsat.data.srh import read_array
from hsat.data.sampler import PatchDataset
from hsat.errors import HSATError
from hsat.evaluate.attention import attention_under_attack, write_attention_maps
from hsat.evaluate.classifiers import fit_linear_probe
from hsat.evaluate.embeddings import Embeddings, dataset_labels, embed, load_embeddings, write_embeddings
from hsat.evaluate.examples import example_rows
from hsat.evaluate.language import language_rows, pick_per_class
from hsat.evaluate.metrics import patch_accuracy, slide_stratified_subset, subset_coverage
from hsat.evaluate.mil import fit_mil, mil_rows, mil_whitebox_rows, save_mil
from hsat.evaluate.sanity import SANITY_COLUMNS, sanity_checks, study_checks
from hsat.evaluate.shift import shift_checks, shift_sweep
from hsat.evaluate.sweep import sweep_alpha, whitebox_sweep
from hsat.io import read_tidy, write_csv
from hsat.models import load_trained_model
from hsat.text import load_text_embeddings


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_info(study: Mapping[str, Any], name: str) -> dict[str, Any]:
    """CSV identity of a model of the study: model, method, group, seed."""
    run_cfg = run_config_for_model(study, name)
    entry = study["models"][name]
    return {"model": name, "method": run_cfg["method"]["name"], "group": entry.get("group", ""), "seed": int(run_cfg["seed"])}


def eval_image_size(study: Mapping[str, Any], run_dir: str | Path) -> int:
    """evaluation.image_size, else the run's data.image_size (run_dir/config.yaml, a validated run config)."""
    size = study["evaluation"]["image_size"]
    if size:
        return int(size)
    return int(read_yaml(Path(run_dir) / "config.yaml")["data"]["image_size"])


def datasets(manifest: str | Path, image_size: int, splits: Sequence[str],
             run_dir: str | Path) -> tuple[list[PatchDataset], list[str]]:
    """One PatchDataset per split, at the pixel scale the run trained at (its data.resize and
    data.allow_upscale; run_dir/config.yaml validated, so a config from before those keys gets
    their defaults)."""
    cfg_path = Path(run_dir) / "config.yaml"
    run_data = validate(read_yaml(cfg_path), "run", source=str(cfg_path))["data"]
    df = read_manifest(manifest)
    classes = list(class_names(df))
    out = []
    for split in splits:
        if not (df["split"] == split).any():
            raise HSATError(f"{manifest}: no {split!r} patches")
        out.append(PatchDataset(df, split=split, image_size=image_size, classes=classes,
                                resize=run_data["resize"], allow_upscale=run_data["allow_upscale"]))
    return out, classes


def embed_run(
    run_dir: str | Path,
    manifest: str | Path,
    study: Mapping[str, Any],
    out_dir: str | Path,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """`hsat embed`: clean train/val backbone features of one model and its fitted linear probe."""
    device = torch.device(device) if device else default_device()
    cfg_eval = resolve_evaluation(study["evaluation"])
    size = eval_image_size(study, run_dir)
    (train_ds, val_ds), classes = datasets(manifest, size, ("train", "val"), run_dir)
    model = load_trained_model(run_dir, device=device, fold_bn=True)
    bs = cfg_eval["batch_size"]
    train = embed(model, train_ds, bs, device, progress, desc="embed train")
    val = embed(model, val_ds, bs, device, progress, desc="embed val")
    for part in (train, val):  # index.csv names patches as the manifest does: the study can move
        part["path"] = stored_paths(part["path"], manifest)
    lin = cfg_eval["linear"]
    probe = fit_linear_probe(train["features"], train["labels"], len(classes), epochs=lin["epochs"],
                             lr=lin["lr"], weight_decay=lin["weight_decay"])
    with torch.no_grad():
        train_acc = patch_accuracy(probe(train["features"]).numpy(), train["labels"].numpy())
    meta = {"run": str(run_dir), "weights_sha256": weights_digest(run_dir), "manifest": str(manifest), "image_size": size,
            "num_features": int(train["features"].shape[1]), "num_classes": len(classes),
            "n_train": int(len(train["labels"])), "n_val": int(len(val["labels"])),
            "linear": dict(lin), "probe_train_acc": train_acc}
    return write_embeddings(out_dir, train, val, probe, classes, meta)


def weights_digest(run_dir: str | Path) -> str:
    """sha256 of a run's trained weights: embeddings name the weights they were computed from."""
    path = Path(run_dir) / "model.safetensors"
    if not path.is_file():
        raise HSATError(f"run directory {run_dir}: missing {path.name} (is this a finished `hsat pretrain` run?)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_val_matches(emb: Embeddings, val_ds: Dataset, emb_dir: str | Path, manifest: str | Path) -> None:
    n = len(val_ds)
    if n != len(emb.val_labels):
        raise HSATError(f"{emb_dir}: embeddings hold {len(emb.val_labels)} validation patches but {manifest} has {n}; rerun `hsat embed`")


def load_for_eval(run_dir, manifest, emb_dir, study: Mapping[str, Any], device):
    """(model, embeddings, validation dataset) of one trained run, checked against each other."""
    emb = load_embeddings(emb_dir)
    recorded = emb.meta.get("weights_sha256")
    if recorded and recorded != weights_digest(run_dir):
        # a bank and probe of other weights would score this model's features: silently wrong
        raise HSATError(f"{emb_dir}: embedded from other weights than {Path(run_dir) / 'model.safetensors'} "
                        "(the run was retrained, or --embeddings names another run's); rerun `hsat embed`")
    size = eval_image_size(study, run_dir)
    if int(emb.meta.get("image_size", size)) != size:
        raise HSATError(f"{emb_dir}: embedded at image size {emb.meta.get('image_size')} but evaluation uses {size}")
    (val_ds,), classes = datasets(manifest, size, ("val",), run_dir)
    if emb.classes and emb.classes != classes:
        raise HSATError(f"{emb_dir}: classes {emb.classes} differ from {manifest}'s {classes}")
    check_val_matches(emb, val_ds, emb_dir, manifest)
    model = load_trained_model(run_dir, device=device, fold_bn=True,
                               precision=resolve_evaluation(study["evaluation"])["attack_precision"])
    return model, emb, val_ds


def attacked_positions(emb: Embeddings, cfg_eval: Mapping[str, Any], seed: int = 0) -> list[int] | None:
    """Validation positions every attack stage runs on (the slide-stratified subset of
    `evaluation.max_val_patches`; None: all), the same for every model of a manifest."""
    val = emb.val_index
    return slide_stratified_subset(emb.val_labels.numpy(), val["slide"], cfg_eval["max_val_patches"] or None, seed=seed,
                                   patients=val["patient"])


def whitebox_run(run_dir, manifest, emb_dir, study, model_name: str, out, device=None, progress: bool = True,
                 examples_out=None) -> pd.DataFrame:
    """`hsat evaluate`: the white-box sweep of one model, written to `out`; with `examples_out`,
    its per-example correctness too (`hsat.evaluate.examples`)."""
    device = torch.device(device) if device else default_device()
    info = model_info(study, model_name)
    model, emb, val_ds = load_for_eval(run_dir, manifest, emb_dir, study, device)
    cfg_eval = resolve_evaluation(study["evaluation"])
    base = {"model": info["model"], "method": info["method"], "group": info["group"], "seed": info["seed"]}
    kept: list[pd.DataFrame] = []
    df = whitebox_sweep(model, emb.probe, emb.bank, val_ds, cfg_eval, model_name=info["model"], method=info["method"],
                        group=info["group"], seed=info["seed"], device=device,
                        indices=attacked_positions(emb, cfg_eval), progress=progress,
                        on_results=lambda res: kept.append(example_rows(res, base)))
    if examples_out is not None:
        write_csv(examples_out, kept[0])
    write_csv(out, df)
    return df


def image_kind(val_ds: Dataset, requested: str = "auto") -> str:
    """`evaluation.shift.image_kind`, with auto read off the first validation patch: a stored
    (2, H, W) array is an SRH patch (hsat.data.srh), anything else an RGB image."""
    if requested != "auto":
        return requested
    arr = read_array(val_ds[0]["path"])
    return "srh" if arr.ndim == 3 and arr.shape[0] == 2 else "rgb"


def shift_run(run_dir, manifest, emb_dir, study, model_name: str, out, device=None, progress: bool = True,
              sanity_out=None) -> pd.DataFrame:
    """`hsat shift`: the natural-shift sweep of one model on the attacked subset, written to
    `out`; with `sanity_out`, its checks (severity 0 is clean, accuracy falls with severity)."""
    device = torch.device(device) if device else default_device()
    info = model_info(study, model_name)
    model, emb, val_ds = load_for_eval(run_dir, manifest, emb_dir, study, device)
    cfg_eval = resolve_evaluation(study["evaluation"])
    indices = attacked_positions(emb, cfg_eval)
    df = shift_sweep(model, emb.probe, emb.bank, val_ds, cfg_eval, kind=image_kind(val_ds, cfg_eval["shift"]["image_kind"]),
                     model_name=info["model"], method=info["method"], group=info["group"], seed=info["seed"],
                     device=device, indices=indices, progress=progress)
    if sanity_out is not None:
        write_csv(sanity_out, shift_checks(df, shift_counts(emb, indices), z=float(cfg_eval["sanity"]["z"])))
    write_csv(out, df)
    return df


def shift_counts(emb: Embeddings, indices: Sequence[int] | None) -> dict[str, int]:
    """How many patches, slides and patients the shift sweep scored (the binomial n per level)."""
    val = emb.val_index
    if indices is not None:
        val = val.iloc[list(indices)]
    return {"patch": len(val), "slide": int(val["slide"].nunique()), "patient": int(val["patient"].nunique())}


def sanity_run(run_dir, manifest, emb_dir, study, model_name: str, out, device=None, progress: bool = True) -> pd.DataFrame:
    """`hsat sanity`: the attack sanity checks of one model, written to `out`."""
    device = torch.device(device) if device else default_device()
    model_info(study, model_name)  # fail early on an unknown model name
    model, emb, val_ds = load_for_eval(run_dir, manifest, emb_dir, study, device)
    cfg_eval = resolve_evaluation(study["evaluation"])
    df = sanity_checks(model, emb.probe, emb.bank, val_ds, cfg_eval, model_name=model_name, device=device,
                       indices=attacked_positions(emb, cfg_eval), progress=progress)
    write_csv(out, df)
    return df


def attacked_patch_count(manifest: str | Path, cfg_eval: Mapping[str, Any]) -> int:
    """How many validation patches each attack ran on (the binomial n of the study checks)."""
    n_val = int((read_manifest(manifest)["split"] == "val").sum())
    cap = cfg_eval["max_val_patches"]
    return min(n_val, int(cap)) if cap else n_val


def attacked_coverage(manifest: str | Path, cfg_eval: Mapping[str, Any], seed: int = 0) -> dict[str, int]:
    """How many validation patches, slides and patients the attacks ran on, and how many slides
    and patients the validation split has (`subset_coverage`): the subset `attacked_positions`
    draws, from the manifest alone."""
    df = read_manifest(manifest)
    val = df[df["split"] == "val"].reset_index(drop=True)
    if val.empty:
        raise HSATError(f"{manifest}: no 'val' patches")
    indices = slide_stratified_subset(label_ids(val, class_names(df)), val["slide"], cfg_eval["max_val_patches"] or None,
                                      seed=seed, patients=val["patient"])
    return subset_coverage(val["slide"], val["patient"], indices)


def sanity_report_run(per_model: Sequence[str | Path], whitebox: str | Path, transfer: str | Path,
                      manifest: str | Path, study: Mapping[str, Any], out: str | Path) -> pd.DataFrame:
    """`hsat report sanity`: every model's checks plus the study-level ones -> results/sanity.csv."""
    cfg_eval = resolve_evaluation(study["evaluation"])
    frames = [read_tidy(p) for p in per_model]
    df_manifest = read_manifest(manifest)
    n_slides = int(df_manifest.loc[df_manifest["split"] == "val", "slide"].nunique())
    frames.append(study_checks(read_tidy(whitebox), read_tidy(transfer), attacked_patch_count(manifest, cfg_eval), cfg_eval,
                               n_slides=n_slides))
    frames = [f for f in frames if not f.empty]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SANITY_COLUMNS))
    write_csv(out, df[list(SANITY_COLUMNS)] if not df.empty else df)
    return df


def attention_run(run_dir, manifest, study: Mapping[str, Any], out_dir=None, patches_per_class: int = 1,
                  device=None, out=None, model_name: str | None = None) -> list[Path]:
    """`hsat attention`: the last block's class-token attention of a ViT run on validation
    patches (the first `patches_per_class` of each class), clean and under PGD on the feature
    objective (`evaluation.attention.eps`, the white-box steps and alpha), written as safetensors
    to `out` (or, without it, to OUT_DIR/attention_<run>.safetensors). Drawing them is the
    report's (`hsat report attention`), so no figure code is part of the evaluation."""
    if out is None and out_dir is None:
        raise HSATError("hsat attention: give --out MAPS.safetensors and/or --out-dir DIR")
    name = model_name or Path(run_dir).name
    out = Path(out) if out is not None else Path(out_dir) / f"attention_{Path(run_dir).name}.safetensors"
    device = torch.device(device) if device else default_device()
    cfg_eval = resolve_evaluation(study["evaluation"])
    size = eval_image_size(study, run_dir)
    (val_ds,), classes = datasets(manifest, size, ("val",), run_dir)
    model = load_trained_model(run_dir, device=device, precision=cfg_eval["attack_precision"])
    labels = dataset_labels(val_ds).tolist()  # without reading every validation image
    chosen = [i for c in range(len(classes)) for i in [j for j, y in enumerate(labels) if y == c][:patches_per_class]]
    if not chosen:
        raise HSATError(f"{manifest}: no validation patches to draw attention maps of")
    x = torch.stack([val_ds[i]["image"] for i in chosen]).to(device)
    wb = cfg_eval["whitebox"]
    eps = cfg_eval["attention"]["eps"]
    maps = attention_under_attack(model, x, eps, sweep_alpha(wb, eps), wb["steps"])
    meta = {"model": name, "classes": list(classes), "eps": float(cfg_eval["attention"]["eps"]),
            "steps": int(wb["steps"]), "attack": "pgd", "objective": "feature"}
    write_attention_maps(out, maps, torch.tensor([labels[i] for i in chosen]), meta)
    return [out]


def language_run(run_dir, manifest, study: Mapping[str, Any], model_name: str, out, device=None,
                 seed: int = 0) -> pd.DataFrame:
    """`hsat language`: an HLSS run's similarities to every class's markers, clean and under
    attack (evaluation.language), on validation patches spread over each class -> tidy CSV."""
    cfg_path = Path(run_dir) / "config.yaml"
    run_cfg = read_yaml(cfg_path)
    hlss = (run_cfg.get("method") or {}).get("hlss")
    if not hlss or not hlss.get("text_embeddings"):
        raise HSATError(f"{cfg_path}: not an HLSS run (method.hlss.text_embeddings is not set)")
    emb = load_text_embeddings(hlss["text_embeddings"])
    cfg_eval = resolve_evaluation(study["evaluation"])
    lcfg = dict(cfg_eval["language"])
    lcfg["alpha"] = attacks.step_size(lcfg["alpha"], lcfg["eps"], lcfg["steps"], cfg_eval["whitebox"]["alpha_scale"])
    device = torch.device(device) if device else default_device()
    (val_ds,), classes = datasets(manifest, eval_image_size(study, run_dir), ("val",), run_dir)
    labels = dataset_labels(val_ds).tolist()  # without reading every validation image
    chosen = pick_per_class(labels, len(classes), int(lcfg["patches_per_class"]))
    if not chosen:
        raise HSATError(f"{manifest}: no validation patches")
    x = torch.stack([val_ds[i]["image"] for i in chosen]).to(device)
    y = torch.tensor([labels[i] for i in chosen], device=device)
    model = load_trained_model(run_dir, device=device, precision=cfg_eval["attack_precision"])
    df = language_rows(model, x, y, emb.markers, emb.marker_classes, emb.marker_names, classes, lcfg,
                       model_info(study, model_name), generator=torch.Generator(device=device).manual_seed(seed))
    write_csv(out, df)
    return df


def mil_run(emb_dir, study: Mapping[str, Any], model_name: str, out, seed: int = 0, *, run_dir=None,
            manifest=None, whitebox_out=None, head_out=None, device=None) -> pd.DataFrame:
    """`hsat mil`: gated attention MIL on one model's frozen clean features -> one slide-level row
    (`out`); with `run_dir`, `manifest` and `whitebox_out`, also the bag attacks through the
    backbone and the head -> `whitebox.csv` rows (classifier abmil). `head_out` keeps the head."""
    info = model_info(study, model_name)
    cfg_eval = resolve_evaluation(study["evaluation"])
    mcfg = cfg_eval["mil"]
    emb = load_embeddings(emb_dir)
    head = fit_mil(emb, epochs=mcfg["epochs"], lr=mcfg["lr"], weight_decay=mcfg["weight_decay"], seed=seed)
    df = mil_rows(emb, info, model=head)
    if whitebox_out is not None:
        if run_dir is None or manifest is None:
            raise HSATError("hsat mil: --whitebox needs --run and --manifest (the bags are attacked end to end)")
        device = torch.device(device) if device else default_device()
        model, emb, val_ds = load_for_eval(run_dir, manifest, emb_dir, study, device)
        wb = mil_whitebox_rows(model, head, val_ds, info, cfg_eval, device=device, seed=seed)
        write_csv(whitebox_out, wb)
    if head_out is not None:
        save_mil(head_out, head, {"model": model_name})
    write_csv(out, df)
    return df
