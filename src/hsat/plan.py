"""What a study will cost before it runs: GPU-hours per stage, from its sizes and a throughput.

The unit of work is one *image pass*: one image of `image_size` px through the backbone forward
and backward (to the parameters when training, to the input when crafting an attack). A stage's
passes follow from the study config alone -- training steps x images per step x passes per
image; validation patches x attack steps x attack configurations -- and its seconds from a
throughput in passes per second. Throughputs are per backbone at 224 px in bf16 on one GPU, scaled
by pixel count to other sizes, and by `FP32_FACTOR` for full-precision work. `DEFAULT_THROUGHPUT`
holds rough figures for one H100; `hsat bench --json B` on your own GPU measures better ones
(`throughputs_from_bench`). The plan is an estimate (+-50 %): it leaves out data loading, the kNN
and linear probes, checkpoints and the small stages (attention maps, language, shifts).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from hsat import CLASSES
from hsat.config import resolve_evaluation, run_config_for_model
from hsat.errors import HSATError

__all__ = [
    "DEFAULT_THROUGHPUT",
    "FP32_FACTOR",
    "OPENSRH_PATCHES",
    "PLAN_COLUMNS",
    "format_plan",
    "patch_counts",
    "plan_study",
    "throughputs_from_bench",
]

DEFAULT_THROUGHPUT: dict[str, float] = {
    "test_resnet": 50000.0,
    "test_vit": 50000.0,
    "resnet10t": 15000.0,
    "resnet18": 9000.0,
    "resnet34": 5000.0,
    "resnet50": 3000.0,
    "resnet101": 1800.0,
    "wide_resnet50_2": 1100.0,
    "vit_tiny_patch16_224": 8000.0,
    "vit_small_patch16_224": 3500.0,
    "vit_base_patch16_224": 1200.0,
}
"""Image passes per second (forward + backward) at 224 px in bf16 on one H100: rough public
training throughputs, not measured here. Replace them with `hsat bench` figures (`--bench`)."""

FP32_FACTOR = 0.25
"""Full fp32 (TF32 off, as crafting at `attack_precision: fp32` runs) against bf16 autocast."""

FORWARD_FACTOR = 1 / 3
"""A forward pass alone (embedding, scoring) against a forward + backward pass."""

AUTOATTACK_SURVIVING = 0.5
"""Share of patches still correctly classified when AutoAttack's later attacks start (each runs on
the survivors of the ones before it): robust models keep about half."""

SQUARE_QUERIES_PER_STEP = 50
"""Forward queries of standard AutoAttack's Square attack per patch and AutoAttack step (5000 at
the original 100 steps): hsat.evaluate.sweep.SQUARE_QUERIES_PER_STEP, kept here so that planning
needs no torch."""

OPENSRH_PATCHES = {"train": 256_000, "val": 58_000}
"""OpenSRH's patches per split (approximately), assumed for a study on `dataset.root` when no
manifest or counts are given."""

PLAN_COLUMNS = ["stage", "model", "backbone", "image_size", "passes", "gpu_hours"]
"""One row per stage and model: image passes and GPU-hours."""


def _pixels(size: int) -> float:
    return (int(size) / 224) ** 2


def _factor(precision: str) -> float:
    return FP32_FACTOR if precision == "fp32" else 1.0


def throughputs_from_bench(report: Mapping[str, Any]) -> dict[str, float]:
    """Per-backbone throughputs (DEFAULT_THROUGHPUT's units) from an `hsat bench --json` report:
    each entry's white-box sweep path (`eval_patches_per_s`: patches x attack steps per second, one
    input-gradient pass each) at its image size and precision, brought to 224 px and bf16."""
    entries = report.get("entries") if isinstance(report, Mapping) else None
    if not entries:
        raise HSATError("bench report: no `entries` (expected the JSON file `hsat bench --json` writes)")
    out: dict[str, float] = {}
    for i, entry in enumerate(entries):
        try:
            rate = float(entry["eval_patches_per_s"])
            size = int(entry["image_size"])
            backbone = str(entry["backbone"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HSATError(f"bench report: entries[{i}] lacks backbone, image_size or eval_patches_per_s ({exc})") from None
        if rate <= 0:
            raise HSATError(f"bench report: entries[{i}].eval_patches_per_s must be positive, got {rate}")
        precision = str(entry.get("effective_precision", "fp32"))
        out[backbone] = rate * _pixels(size) / _factor(precision)
    return out


def _rate(throughputs: Mapping[str, float], backbone: str, size: int, precision: str) -> float:
    if backbone not in throughputs:
        raise HSATError(f"no throughput for backbone {backbone!r} (have: {', '.join(sorted(throughputs))}); "
                        f"measure it: hsat bench --json B.json --extra {backbone}@{size}, then --bench B.json")
    return throughputs[backbone] / _pixels(size) * _factor(precision)


def _train_passes(run: Mapping[str, Any]) -> float:
    """Image passes of one training step: every view through the training pass (twice for clean +
    adversarial views), plus the attack's input-gradient passes; DINO's local crops by their pixels,
    the teacher's forward of the global crops as a forward pass."""
    data, attack, method = run["data"], run["attack"], run["method"]
    patches = data["patients_per_batch"] * data["num_slide_samples"] * data["num_patch_samples"]
    views = patches * data["num_transforms"]
    local = data.get("local_crops") or {}
    local_views = patches * int(local.get("number", 0)) * (int(local.get("size", 0)) / int(data["image_size"])) ** 2
    passes = views + local_views
    if method.get("family") == "dino":
        passes += views * FORWARD_FACTOR  # the teacher sees the global crops
    if method.get("adversarial"):
        attack_steps = int(attack["steps"])
        trained = 1 if attack["only_adversarial"] else 2
        passes = views * attack_steps + passes * trained
    return passes


def _autoattack_passes(version: str, steps: int) -> float:
    """Input-gradient passes per patch of one AutoAttack run (one eps)."""
    targets = len(CLASSES) - 1
    passes = steps * (1 + targets * AUTOATTACK_SURVIVING)  # APGD-CE, then APGD-T on the survivors
    if version == "standard":  # + FAB-T (about two passes a step) and Square (forward queries)
        passes += 2 * steps * targets * AUTOATTACK_SURVIVING + SQUARE_QUERIES_PER_STEP * steps * AUTOATTACK_SURVIVING * FORWARD_FACTOR
    return passes


def _models(names: Sequence[str], study_models: Sequence[str]) -> list[str]:
    unknown = [m for m in names if m not in study_models]
    if unknown:
        raise HSATError(f"evaluation lists unknown model(s) {unknown}; models are {list(study_models)}")
    return list(names) or list(study_models)


def plan_study(study: Mapping[str, Any], patches: Mapping[str, int],
               throughputs: Mapping[str, float] | None = None) -> pd.DataFrame:
    """GPU-hours of every stage of `study` (a resolved study config) per model (PLAN_COLUMNS), for
    `patches` {"train": n, "val": n} patches per split and `throughputs` (default DEFAULT_THROUGHPUT)."""
    rates = dict(DEFAULT_THROUGHPUT if throughputs is None else throughputs)
    n_train, n_val = int(patches["train"]), int(patches["val"])
    if n_train < 0 or n_val < 0:
        raise HSATError(f"patch counts must be >= 0, got {dict(patches)}")
    ev = resolve_evaluation(study.get("evaluation", {}))
    n_slides_val = n_val  # the MIL bag attack attacks every validation slide whole
    if ev["max_val_patches"]:
        n_val = min(n_val, int(ev["max_val_patches"]))  # the attacked subset
    models = list(study["models"])
    wb = ev["whitebox"]
    attack_prec = ev["attack_precision"]
    aa_models = set(_models(wb["autoattack"]["models"], models)) if "autoattack" in wb["attacks"] else set()
    sweep_configs = sum(1 for a in wb["attacks"] if a != "autoattack") * len(wb["eps"]) * len(wb["objectives"])
    sanity = ev["sanity"]
    sanity_models = set(_models(sanity["models"], models)) if sanity["enabled"] else set()
    transfer = ev["transfer"]
    surrogates = _models(transfer["models"], models) if transfer["enabled"] else []
    mil = ev["mil"]
    mil_models = set(_models(mil["models"], models)) if mil["enabled"] and mil["attack"] else set()

    rows = []

    def add(stage: str, model: str, run: Mapping[str, Any], passes: float, precision: str) -> None:
        backbone, size = run["model"]["backbone"], int(run["data"]["image_size"])
        seconds = passes / _rate(rates, backbone, size, precision)
        rows.append({"stage": stage, "model": model, "backbone": backbone, "image_size": size,
                     "passes": passes, "gpu_hours": seconds / 3600})

    for name in models:
        run = run_config_for_model(study, name)
        add("pretrain", name, run, run["train"]["steps"] * _train_passes(run), run["precision"])
        # Evaluation runs at the study's evaluation.image_size, else the run's.
        eval_run = {**run, "data": {**run["data"], "image_size": ev["image_size"] or run["data"]["image_size"]}}
        add("embed", name, eval_run, (n_train + n_val) * FORWARD_FACTOR, "fp32")
        add("whitebox", name, eval_run, n_val * (sweep_configs * int(wb["steps"]) + sweep_configs * FORWARD_FACTOR), attack_prec)
        if name in aa_models:
            add("autoattack", name, eval_run,
                n_val * len(wb["eps"]) * _autoattack_passes(wb["autoattack"]["version"], int(wb["autoattack"]["steps"])),
                attack_prec)
        if name in sanity_models:
            steps = int(wb["steps"])
            per_patch = sum(sanity["steps"]) + len(sanity["eps"]) * steps + int(sanity["restarts"]) * steps
            add("sanity", name, eval_run, n_val * per_patch, attack_prec)
        if name in surrogates:
            crafted = n_val * int(transfer["steps"])
            scored = n_val * (len(surrogates) - 1) * FORWARD_FACTOR  # the other surrogates' sets, on this target
            add("transfer", name, eval_run, crafted + scored, attack_prec)
        if name in mil_models:
            add("mil", name, eval_run,
                n_slides_val * int(wb["steps"]) * len(wb["eps"]) * len(mil["attacks"]) * len(mil["objectives"]), attack_prec)
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def _hours(h: float) -> str:
    return f"{h:.1f}" if h >= 10 else f"{h:.2f}"


def format_plan(plan: pd.DataFrame, source: str, patches: Mapping[str, int], patches_source: str = "given",
                max_val_patches: int | None = None) -> str:
    """Per stage and in all: jobs and GPU-hours, then what the figures assume."""
    by_stage = plan.groupby("stage", sort=False).agg(jobs=("model", "size"), gpu_hours=("gpu_hours", "sum"))
    lines = [f"{'stage':<12}{'jobs':>6}{'GPU-hours':>12}"]
    for stage, row in by_stage.iterrows():
        lines.append(f"{stage:<12}{int(row['jobs']):>6}{_hours(row['gpu_hours']):>12}")
    lines.append(f"{'total':<12}{len(plan):>6}{_hours(plan['gpu_hours'].sum()):>12}")
    lines.append(f"patches: {patches['train']:,} train, {patches['val']:,} validation ({patches_source})")
    if max_val_patches and max_val_patches < patches["val"]:
        lines.append(f"attacks on {max_val_patches:,} of the validation patches (evaluation.max_val_patches)")
    lines.append(f"throughputs: {source}")
    lines.append("estimates (+-50 %), one GPU per job: the wall time is at best the total over your GPUs")
    return "\n".join(lines)


def patch_counts(study: Mapping[str, Any], manifest: str | None = None) -> tuple[dict[str, int], str]:
    """Train and validation patches the plan assumes, and where they come from: `manifest` (or the
    study's dataset.manifest), else OpenSRH's sizes for a study on `dataset.root`, else the
    embedded cohort's (dataset.synth)."""
    from hsat.data.manifest import read_manifest

    manifest = manifest or study.get("dataset", {}).get("manifest")
    if manifest:
        counts = read_manifest(manifest)["split"].value_counts()
        return {"train": int(counts.get("train", 0)), "val": int(counts.get("val", 0))}, str(manifest)
    if study.get("dataset", {}).get("root"):
        return dict(OPENSRH_PATCHES), "OpenSRH's approximate sizes"
    synth = study["dataset"]["synth"]  # the embedded cohort the workflow synthesises
    total = int(synth["patients"]) * int(synth["slides"]) * int(synth["patches"])
    val = round(total * float(synth["val_fraction"]))
    return {"train": total - val, "val": val}, "the embedded cohort's dataset.synth sizes"

