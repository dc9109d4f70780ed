"""Hierarchical (adversarial) self-supervised pretraining: `pretrain(cfg, out_dir)`, top to bottom.

The per-step work is one function, `hsat_step` (inner maximisation `adversarial_views` + outer
minimisation `encoder_update`), so `hsat bench` times exactly the step `pretrain` runs.

One min-max step (HSAT, Malik et al. MICCAI 2025), on a batch of P patients x S slides x K
patches x V views:

    x_adv = PGD-maximise  hierarchical_loss(f(x'), method.max_levels)   over ||x' - x||_inf <= eps
    minimise              hierarchical_loss(f(x_adv), method.min_levels)
                          + clean_weight * hierarchical_loss(f(x), method.min_levels)

HiDisc (non-adversarial) minimises the clean term alone. Variants are data (hsat.methods).

Choices worth knowing:
- The attack only builds input gradients: the model's parameters are frozen (`frozen`) and the
  model runs in `attack.bn_mode` (`attack_mode`) while PGD runs; the attack calls the plain
  module, never the DDP wrapper.
- Clean and adversarial views go through the encoder in ONE forward pass (concatenated), so in
  train mode their batch-norm statistics are shared; the backward is one pass as well.
- Under torchrun every rank holds a slice of the global batch of patients. Embeddings are
  gathered with gradients before every loss (the encoder's AND the attack's objective), so each
  rank computes the loss of the GLOBAL batch and the attack maximises exactly the loss one
  process would maximise on the whole batch. Only the random start differs: it is drawn per
  rank from a generator seeded by (seed, step, rank).
- Weight decay (AdamW) is applied to weight matrices/kernels only, not to biases and norm
  parameters (as DINO does).
- `precision: bf16` autocasts the forward passes (losses stay fp32); `auto` (the default) does so
  where the device runs bf16 natively (`hsat.precision`): a GPU, or a CPU with AVX512-BF16/AMX,
  so one study config runs fast on a laptop and on a GPU node alike. The precision used is
  stored in checkpoint.pt (`precision`).
- Resuming is exact on CPU: data and attack noise are pure functions of (seed, step[, rank]),
  schedules are arrays indexed by the step, and the checkpoint holds model, optimiser and RNG
  states. Only rank 0's RNG state is saved (nothing in the loop draws from the global RNGs).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from hsat.config import validate
from hsat.data.manifest import class_names, read_manifest
from hsat.data.sampler import HierarchicalBatchSampler, HierarchicalDataset, make_loader
from hsat.data.srh import read_image
from hsat.data.transforms import check_patch_size, loss_weights, strength_at
from hsat.distributed import convert_sync_batchnorm, gather_with_grad, init_distributed, wrap_ddp
from hsat.encoders import init_weights, load_init_backbone
from hsat.errors import HSATError
from hsat.io import atomic_stream, remove_temporaries, write_text, write_yaml
from hsat.methods import Objective, Robust, build_objective, resolve_method, trains_encoder
from hsat.models import choose_attention_kernel, model_from_config, save_weights, unwrap
from hsat.precision import autocast_factory, effective_precision, safe_precision
from hsat.progress import TrainingLive, progress_line

log = logging.getLogger(__name__)

__all__ = [
    "pretrain",
    "hsat_step",
    "adversarial_views",
    "encoder_update",
    "embed_views",
    "StepResult",
    "NonFiniteLoss",
    "training_loader",
    "make_optimizer",
    "strength_function",
    "cosine_schedule",
    "linear_warmup",
    "load_checkpoint",
    "config_differences",
    "fit_to_data",
    "BOOKKEEPING_KEYS",
]

CONFIG, CHECKPOINT, WEIGHTS, LOG = "config.yaml", "checkpoint.pt", "model.safetensors", "log.jsonl"
CODE_STAMP, LIVE_DIR = "code.version", "dvclive"
"""The training code's version (`hsat.provenance.code_version`) and dvclive's folder, in the run directory."""

BOOKKEEPING_KEYS = frozenset(
    {"train.steps", "train.checkpoint_every", "train.log_every", "data.num_workers", "data.cache_mb", "threads", "device",
     "compile"}
)
"""Config keys that may change between a run and its resumption (they do not change the method).

Changing `train.steps` recomputes the lr / eps / strength schedules for the new length, so a run
extended this way is not identical to one launched with the final length.
"""

StepCallback = Callable[[int, Mapping[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# schedules: plain arrays indexed by the global step


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0) -> np.ndarray:
    """Linear warm-up from 0 to `base`, then half a cosine from `base` to `final` (DINO's scheduler)."""
    warmup_steps = min(int(warmup_steps), int(total_steps))
    warmup = np.linspace(0.0, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    rest = np.arange(total_steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * rest / max(len(rest), 1)))
    out = np.concatenate([warmup, cosine])
    assert len(out) == total_steps
    return out


def linear_warmup(value: float, total_steps: int, warmup_steps: int, start: float = 0.0) -> np.ndarray:
    """Grows linearly from `start` to `value` over `warmup_steps`, then stays (constant without warm-up)."""
    steps = np.arange(total_steps, dtype=np.float64)
    if warmup_steps <= 0:
        return np.full(total_steps, float(value))
    return float(start) + (float(value) - float(start)) * np.minimum(1.0, steps / warmup_steps)


# ---------------------------------------------------------------------------------------------
# checkpoints: plain tensors and containers only (torch.load(weights_only=True) executes no code)


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint without executing code (`weights_only=True`); HSATError otherwise."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign objects, RuntimeError/EOFError for junk
        raise HSATError(
            f"{path}: not a loadable training checkpoint (only tensors and plain containers are "
            f"accepted; refusing to unpickle arbitrary objects): {exc}"
        ) from exc
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= set(state):
        raise HSATError(f"{path}: not an hsat training checkpoint (expected keys model, optimizer, step)")
    return state


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     step: int, cfg: Mapping[str, Any], objective_state: Mapping[str, Any] | None = None,
                     precision: str = "fp32") -> None:
    state = {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "rng": _rng_state(),
        "config": json.loads(json.dumps(cfg)),
        "precision": precision,  # what the steps ran in (config `auto` resolves per device)
    }
    if objective_state is not None:
        state["objective"] = objective_state  # the method's own state (DINO: teacher, center)
    with atomic_stream(path) as fh:  # a file object: the archive's member names do not vary
        torch.save(state, fh)


# ---------------------------------------------------------------------------------------------
# resume bookkeeping


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """Keys (dotted) whose values differ between two run configs, bookkeeping keys excluded."""
    a, b = _flatten(saved), _flatten(requested)
    return sorted(k for k in set(a) | set(b) if k not in BOOKKEEPING_KEYS and a.get(k) != b.get(k))


def _resume_log(path: Path, step: int) -> None:
    """Keep the log entries up to `step` (a killed run may have logged past its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
            kept.append(json.dumps(rec))
    write_text(path, "".join(k + "\n" for k in kept))


def _append_log(path: Path, record: Mapping[str, Any]) -> None:
    """One line of log.jsonl; a refused write names the file (a cut line is dropped on resume)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _normalise(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate (defaults filled) and resolve the method; idempotent on a resolved config."""
    out = validate(cfg, "run")
    out["method"] = resolve_method(out["method"])
    return json.loads(json.dumps(out))  # plain containers (YAML and checkpoint friendly)


def _attack_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    state = np.random.SeedSequence([seed % 2**32, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed((int(state[0]) << 31) ^ int(state[1]))


# ---------------------------------------------------------------------------------------------
# one min-max step: the function `pretrain` runs, and the one `hsat bench` times


class NonFiniteLoss(FloatingPointError):
    """The step's loss is NaN or infinite; raised before the backward, so no parameter changed."""

    def __init__(self, value: float) -> None:
        super().__init__(f"non-finite loss ({value})")
        self.value = value


@dataclass
class StepResult:
    """What one optimiser step reports: the minimised total and its detached per-level terms."""

    loss: float
    losses: dict[str, torch.Tensor]  # loss_clean_<level>, loss_adv_<level> (detached tensors)
    images: int  # images (views) in the local batch


def embed_views(module: torch.nn.Module, x: torch.Tensor, shape: tuple[int, ...],
                autocast: Callable[[], Any] = contextlib.nullcontext, output: str = "embedding") -> list[torch.Tensor]:
    """The model's `output` ("embedding", or "logits" of the classification head) of the
    (N*c, C, H, W) stack as c tensors (P_global, S, K, V, D), gathered over ranks."""
    with autocast():
        z = module(x) if output == "embedding" else module(x, output=output)
    chunks = z.float().chunk(x.shape[0] // math.prod(shape))
    return [gather_with_grad(c.reshape(*shape, -1)) for c in chunks]


def adversarial_views(
    model: torch.nn.Module,
    x: torch.Tensor,
    shape: tuple[int, ...],
    *,
    method: Mapping[str, Any],
    attack: Mapping[str, Any],
    eps: float,
    generator: torch.Generator | None = None,
    fast: torch.nn.Module | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """Inner maximisation: PGD on the method's attack loss (HiDisc's: the hierarchical loss of
    `method.max_levels`; eps in 1/255), through `hsat.methods.robust.Robust`.

    Only input gradients are built: parameters are frozen and the model runs in
    `attack.bn_mode` (restored after). `fast` is what the attack calls (the compiled model);
    never the DDP wrapper, whose hooks would expect a parameter backward.
    """
    objective = build_objective(method)
    robust = objective if isinstance(objective, Robust) else Robust(objective)
    return robust.adversarial_views(model, x, shape, attack=attack, eps=eps, embed=embed_views, generator=generator,
                                    fast=fast, autocast=autocast)


def encoder_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor | None,
    x_adv: torch.Tensor | None,
    shape: tuple[int, ...],
    *,
    method: Mapping[str, Any],
    clean_weight: float = 1.0,
    adv_weight: float = 1.0,
    separate_forward: bool = False,
    net: torch.nn.Module | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    grad_clip: float | None = None,
    labels: torch.Tensor | None = None,
    objective: Objective | None = None,
) -> StepResult:
    """Outer minimisation: forward of the clean and adversarial views, loss, ONE backward, optimiser step.

    `x` None means no clean term (attack.only_adversarial); `x_adv` None means HiDisc. The two
    kinds of view go through the encoder in one forward of [clean; adversarial] (one batch-norm
    batch) or, with `separate_forward`, in two (each its own batch-norm batch, as the reference
    HSAT code does). Loss = clean_weight * L_clean + adv_weight * L_adv. Raises NonFiniteLoss
    before the backward. Parameter gradients are accumulated into whatever `.grad` holds (the
    caller zeroes them).
    """
    net = model if net is None else net
    objective = build_objective(method) if objective is None else objective
    views = [v for v in (x, x_adv) if v is not None]
    if separate_forward and len(views) > 1:
        z = [embed_views(net, v, shape, autocast, objective.output)[0] for v in views]
    else:
        z = embed_views(net, torch.cat(views) if len(views) > 1 else views[0], shape, autocast, objective.output)
    z_local = objective.local_outputs(net, embed_views, autocast)  # DINO's local crops (student only)
    losses: dict[str, torch.Tensor] = {}
    total: torch.Tensor | None = None
    if x is not None:
        clean = objective.loss_of(z.pop(0), labels, z_local)
        losses.update({f"loss_clean_{k}": v.detach() for k, v in clean.items() if k != "total"})
        total = float(clean_weight) * clean["total"]
    if x_adv is not None:
        adv = objective.loss_of(z.pop(0), labels, z_local)
        losses.update({f"loss_adv_{k}": v.detach() for k, v in adv.items() if k != "total"})
        total = float(adv_weight) * adv["total"] if total is None else total + float(adv_weight) * adv["total"]
    assert total is not None, "encoder_update needs clean or adversarial views"
    loss_value = float(total.detach())
    if not math.isfinite(loss_value):
        raise NonFiniteLoss(loss_value)
    total.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    objective.before_optimizer_step(unwrap(model))
    optimizer.step()
    return StepResult(loss=loss_value, losses=losses, images=int(math.prod(shape)))


def hsat_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    *,
    method: Mapping[str, Any],
    attack: Mapping[str, Any],
    eps: float,
    clean_weight: float = 1.0,
    adv_weight: float = 1.0,
    generator: torch.Generator | None = None,
    fast: torch.nn.Module | None = None,
    net: torch.nn.Module | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    channels_last: bool = False,
    grad_clip: float | None = None,
    labels: torch.Tensor | None = None,
    objective: Objective | None = None,
    local: torch.Tensor | None = None,
    step: int = 0,
) -> StepResult:
    """One HSAT (or HiDisc) optimiser step on `images` (P, S, K, V, C, H, W), already on the device.

    `labels` (P,) are the patients' class ids, which only the supervised methods read.
    `objective` is the run's (stateful methods, DINO, keep one for the whole run; built from
    `method` when None); `local` (P, S, K, L, C, h, w) are the local crops of `data.local_crops`
    and `step` the optimiser step (its schedules).

    `model` is the plain HSATModel (frozen during the attack), `fast` what the attack calls
    (default `model`), `net` what the encoder's forward/backward goes through (default `fast`;
    the DDP wrapper under torchrun). `eps` is this step's radius in 1/255 units and
    `clean_weight` / `adv_weight` the weights of the two terms (adversarial methods only;
    `attack.forward` says whether they share a batch-norm forward). The optimiser's
    learning rate is the caller's to set.
    """
    fast = model if fast is None else fast
    net = fast if net is None else net
    optimizer.zero_grad(set_to_none=True)
    shape = tuple(images.shape[:4])
    x = images.flatten(0, 3)  # (N, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    objective = build_objective(method) if objective is None else objective
    if labels is not None:
        labels = gather_with_grad(labels)  # the labels of the gathered (P_global, ...) outputs
    local_x, local_shape = None, None
    if local is not None:
        local_shape = tuple(local.shape[:4])
        local_x = local.flatten(0, 3)
        if channels_last:
            local_x = local_x.contiguous(memory_format=torch.channels_last)
    objective.begin_step(model, x, shape, step=step, embed=embed_views, autocast=autocast, local=local_x,
                         local_shape=local_shape)
    # The objective says what the encoder trains on: clean views (HiDisc), or a robust wrapper's
    # PGD views that maximise the method's own loss (and the clean ones unless only_adversarial).
    x_clean, x_adv = objective.training_views(model, x, shape, attack=attack, eps=eps, embed=embed_views,
                                              generator=generator, fast=fast, autocast=autocast, labels=labels)
    result = encoder_update(model, optimizer, x_clean, x_adv, shape, method=method,
                            clean_weight=float(clean_weight) if objective.adversarial else 1.0,
                            adv_weight=float(adv_weight) if objective.adversarial else 1.0,
                            separate_forward=attack["forward"] == "separate", net=net, autocast=autocast,
                            grad_clip=grad_clip, labels=labels, objective=objective)
    objective.after_step(model)
    return result


# ---------------------------------------------------------------------------------------------
# the pieces pretrain builds, shared with `hsat bench`


def dynamic_augmentation(cfg: Mapping[str, Any]) -> bool:
    """Whether the augmentation strength decays: `augment.dynamic`, where `auto` means for
    adversarial methods (HSAT's recipe) and not for HiDisc (which keeps its fixed augmentation)."""
    dynamic = cfg["augment"]["dynamic"]
    return bool(cfg["method"]["adversarial"]) if dynamic == "auto" else bool(dynamic)


def strength_function(cfg: Mapping[str, Any]) -> Callable[[int], float]:
    """Augmentation strength as a function of the step (constant, or decaying when dynamic)."""
    augment = cfg["augment"]
    return functools.partial(strength_at, total_steps=int(cfg["train"]["steps"]), start=augment["strength"],
                             end=augment["min_strength"], dynamic=dynamic_augmentation(cfg), stages=augment["stages"])


def training_loader(
    cfg: Mapping[str, Any],
    *,
    start_step: int = 0,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """The hierarchical DataLoader of a run config (its `data.manifest`, train split), from `start_step`."""
    data, seed = cfg["data"], int(cfg["seed"])
    manifest = read_manifest(data["manifest"])
    dataset = HierarchicalDataset(
        manifest,
        split="train",
        num_slide_samples=data["num_slide_samples"],
        num_patch_samples=data["num_patch_samples"],
        num_transforms=data["num_transforms"],
        image_size=data["image_size"],
        prob=cfg["augment"]["prob"],
        strength_fn=strength_function(cfg),
        seed=seed,
        classes=class_names(manifest),
        preset=cfg["augment"]["preset"],
        resize=data["resize"],
        allow_upscale=data["allow_upscale"],
        local_crops=data["local_crops"],
        cache_mb=data["cache_mb"],
    )
    sampler = HierarchicalBatchSampler(
        dataset,
        patients_per_batch=data["patients_per_batch"],
        total_steps=int(cfg["train"]["steps"]),
        start_step=start_step,
        seed=seed,
        balance_classes=data["balance_classes"],
        rank=rank,
        world_size=world,
    )
    return make_loader(dataset, sampler, num_workers=data["num_workers"], pin_memory=pin_memory)


def freeze_unused_head(model: torch.nn.Module, output: str) -> None:
    """Stop gradients to the head the objective never reads (the projection head of a supervised
    method, a classification head of the others): DDP requires every parameter it registers to
    get a gradient each step. Nothing else changes: such parameters never had one."""
    unused = model.head if output == "logits" else model.classifier
    if unused is not None:
        unused.requires_grad_(False)


def make_optimizer(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices/kernels only (not biases and norms), as DINO."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    # The fused kernel (CPU and CUDA, float32 parameters) is the same update in one pass: ~5x
    # faster than the per-tensor loop on a small CPU model.
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["optim"]["lr"], weight_decay=cfg["optim"]["weight_decay"], fused=fused,
    )


# ---------------------------------------------------------------------------------------------
# the run


def _check_first_patch(cfg: Mapping[str, Any]) -> None:
    """The first training patch must hold the crop (after data.resize): the common mistake of a
    dataset at another scale fails at once, naming the file, not in a DataLoader worker later."""
    table = read_manifest(cfg["data"]["manifest"], check_files=False)
    train = table[table["split"] == "train"]
    if len(train):
        path = str(train["path"].iloc[0])
        check_patch_size(path, read_image(path), int(cfg["data"]["image_size"]), cfg["data"]["resize"],
                         cfg["data"]["allow_upscale"])


def _image_sizes(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """The input sizes the encoder sees in training: the global crop and, with multi-crop, the local one."""
    crops = cfg["data"]["local_crops"]
    return (int(cfg["data"]["image_size"]),) + ((int(crops["size"]),) if crops["number"] else ())


def _checked_precision(cfg: Mapping[str, Any], precision: str, device: torch.device) -> tuple[str, list[str]]:
    """`safe_precision` on a throwaway copy of the model, before the run folder is written: an
    explicit bf16 that the CPU computes wrong is refused here, not at a NaN some steps in. The copy
    is built under a forked RNG, so the run's own initialisation is what it was."""
    if precision != "bf16" or device.type != "cpu":
        return precision, []
    with torch.random.fork_rng(devices=[]):
        probe = model_from_config(cfg)
    return safe_precision(precision, cfg["precision"], device, probe, _image_sizes(cfg))


def fit_to_data(cfg: dict[str, Any]) -> None:
    """Set the run's settings that depend on its manifest, in place, before the config is compared
    with a saved run and stamped (so config.yaml says what ran, and a resumed run agrees):

    - model.num_classes, when the method trains a classification head and it is not set (the
      evaluation rebuilds the head from it);
    - data.patients_per_batch at most the number of training patients (a small cohort of your own
      draws all of them every step; patients are drawn without replacement within a step).
    """
    table = read_manifest(cfg["data"]["manifest"], check_files=False)
    if build_objective(cfg["method"]).needs_classifier and not cfg["model"]["num_classes"]:
        cfg["model"]["num_classes"] = len(class_names(table))
    n_train = int(table.loc[table["split"] == "train", "patient"].nunique())
    wanted = int(cfg["data"]["patients_per_batch"])
    if 2 <= n_train < wanted:
        log.warning("data.patients_per_batch=%d, but %s has %d training patients: %d per batch",
                    wanted, cfg["data"]["manifest"], n_train, n_train)
        cfg["data"]["patients_per_batch"] = n_train


def restart_from_checkpoint(
    out_dir: Path, cfg: Mapping[str, Any], *, on_config_change: str = "error", code_version: str | None = None
) -> tuple[dict[str, Any] | None, bool]:
    """(the checkpoint to resume from, or None to start at step 0; whether the old run is discarded).

    A run directory whose config differs from `cfg` is refused (`on_config_change="error"`) or
    discarded ("restart"); so is one stamped with another `code_version` under "restart" (it only
    warns otherwise). A checkpoint beyond `train.steps` is an error, or discarded under "restart"
    (the config changed: the workflow's `--restart-if-changed` retrains).
    """
    if on_config_change not in ("error", "restart"):
        raise ValueError(f"on_config_change must be 'error' or 'restart', not {on_config_change!r}")
    restart = False
    # A config.yaml beside neither checkpoint nor weights is a run that stopped before its first
    # checkpoint (a missing image, a refused weights file): nothing to resume or to protect, so
    # the corrected command starts afresh in the same folder.
    started = (out_dir / CHECKPOINT).exists() or (out_dir / WEIGHTS).exists()
    if (out_dir / CONFIG).exists() and started:
        with open(out_dir / CONFIG, encoding="utf-8") as fh:
            saved = yaml.safe_load(fh) or {}
        diff = config_differences(saved, cfg)
        if diff and on_config_change != "restart":
            raise HSATError(
                f"{out_dir / CONFIG}: the run directory holds a run with a different configuration "
                f"(differing keys: {', '.join(diff)}); use another --out, the original settings, "
                "or --restart-if-changed"
            )
        if diff:
            log.warning("%s: configuration changed (%s); starting afresh", out_dir, ", ".join(diff))
            restart = True
    stamp = out_dir / CODE_STAMP
    old_code = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else None
    if code_version and started and (out_dir / CONFIG).exists() and old_code != code_version and not restart:
        if on_config_change == "restart":
            log.warning("%s: training code changed (%s -> %s); starting afresh", out_dir, old_code, code_version)
            restart = True
        else:
            log.warning("%s: resuming a run made by other training code (%s, now %s)", out_dir, old_code, code_version)
    ckpt_path = out_dir / CHECKPOINT
    if restart or not ckpt_path.exists():
        return None, restart
    state = load_checkpoint(ckpt_path)
    total_steps = int(cfg["train"]["steps"])
    if state["step"] > total_steps:
        # A shorter run cannot be resumed from a longer one: its schedules end earlier.
        if on_config_change == "restart":
            log.warning("%s: checkpoint at step %d, beyond train.steps=%d; starting afresh",
                        out_dir, state["step"], total_steps)
            return None, True
        raise HSATError(
            f"{ckpt_path} is at step {state['step']}, beyond train.steps={total_steps}: set train.steps "
            f"to at least {state['step']} to resume it, or start afresh with --restart-if-changed "
            "(discards this run) or another --out"
        )
    return state, restart


def _begin_run_dir(out_dir: Path, cfg: Mapping[str, Any], code_version: str | None, restart: bool,
                   start_step: int) -> None:
    """Rank 0: drop a discarded run's checkpoint and weights and what a killed save left (its
    temporary files), stamp the config and code, mark the log."""
    for name in (CHECKPOINT, WEIGHTS, CONFIG, CODE_STAMP, LOG):
        for tmp in remove_temporaries(out_dir / name):
            log.info("removed %s (left by an interrupted write)", tmp)
    if restart:
        (out_dir / CHECKPOINT).unlink(missing_ok=True)
        (out_dir / WEIGHTS).unlink(missing_ok=True)
    write_yaml(out_dir / CONFIG, cfg)
    if code_version:
        write_text(out_dir / CODE_STAMP, code_version + "\n")
    _resume_log(out_dir / LOG, start_step)


def pretrain(
    cfg: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    callback: StepCallback | None = None,
    on_config_change: str = "error",
    code_version: str | None = None,
    live_dir: str | os.PathLike | None = None,
) -> Path:
    """Pretrain an encoder as `cfg` says; write config.yaml, checkpoint.pt, log.jsonl, model.safetensors.

    Running it again on a finished `out_dir` returns at once; on a partial one it resumes from
    checkpoint.pt (`restart_from_checkpoint`). If the method-relevant config changed, it refuses (`on_config_change="error"`)
    or discards the old run and starts afresh (`"restart"`, what the workflow uses so that an
    interrupted job resumes while a changed one retrains); a `code_version` other than the one
    stamped in `out_dir` counts as such a change under "restart" (and only warns otherwise).
    Training curves go to dvclive in `live_dir` (default `out_dir/dvclive`) for `dvc plots`.
    `callback(step, record)` is
    called on every rank after each optimiser step (after that step's checkpoint is written);
    an exception raised there stops the run, as a kill would. Returns `out_dir`.
    """
    cfg = _normalise(cfg)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    seed = int(cfg["seed"])
    total_steps = int(cfg["train"]["steps"])
    method, attack = cfg["method"], cfg["attack"]
    if not trains_encoder(method):
        raise HSATError(f"method {method['name']!r} trains nothing: its encoder's weights are read from a file "
                        "(hsat pretrain imports them; hsat.encoders.import_encoder)")
    if not cfg["data"]["manifest"]:
        raise HSATError("data.manifest is not set: pass --manifest or data.manifest=PATH")
    _check_first_patch(cfg)  # a patch too small for the crop stops here, before anything is written
    fit_to_data(cfg)
    build_objective(method).complete_config(cfg, out_dir)  # HLSS: the text embeddings' shape
    init_path = init_weights(cfg)  # fine-tuning: the source's hash joins the config, so a changed source retrains

    # ============ processes, device, precision ... ============
    rank, world, _local_rank, device = init_distributed(cfg["device"])
    is_main = rank == 0
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    precision = effective_precision(cfg["precision"], device)
    precision, unsafe = _checked_precision(cfg, precision, device)  # refused before anything is written
    if unsafe and is_main:
        log.warning("bf16 on the CPU gives wrong weight gradients for strided convolutions on 1 x 1 inputs "
                    "(%s at %s px); training in fp32 (precision: auto)", ", ".join(unsafe[:3]),
                    "/".join(map(str, _image_sizes(cfg))))

    # ============ resume or start ... ============
    state, restart = restart_from_checkpoint(out_dir, cfg, on_config_change=on_config_change, code_version=code_version)
    if state is not None and state["step"] == total_steps and (out_dir / WEIGHTS).exists():
        log.info("%s: finished run (%d steps); nothing to do", out_dir, total_steps)
        return out_dir
    start_step = int(state["step"]) if state else 0
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

    # ============ data ... ============
    loader = training_loader(cfg, start_step=start_step, rank=rank, world=world, pin_memory=device.type == "cuda")

    # ============ model ... ============
    model = model_from_config(cfg)  # identical initialisation on every rank (seeded above)
    if state is not None:
        model.load_state_dict(state["model"])
    else:
        if init_path is not None:
            load_init_backbone(model, init_path)  # robust fine-tuning: the source's backbone at step 0
            log.info("%s: backbone initialised from %s (sha256 %s)", out_dir, init_path, cfg["init_from"]["sha256"])
        build_objective(method).init_model(model)  # HLSS: level heads from the attribute embeddings
    model = model.to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    autocast = autocast_factory(precision, device)
    choose_attention_kernel(model, device, precision)  # before DINO's teacher is copied from it
    freeze_unused_head(model, build_objective(method).output)
    if world > 1 and cfg["model"]["sync_bn"]:
        model = convert_sync_batchnorm(model, device)
    fast = torch.compile(model) if cfg["compile"] else model  # what the attack calls
    net = wrap_ddp(fast, device)  # what the encoder's forward/backward goes through

    # ============ optimiser, the method's own state (DINO's teacher) ... ============
    optimizer = make_optimizer(model, cfg)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    objective = build_objective(method)
    objective.setup(model, total_steps)
    if state is not None and state.get("objective") is not None:
        objective.load_state_dict(state["objective"])

    # ============ the run directory: stamped once data and model are ready ... ============
    # (a run that cannot start -- a missing image, a refused weights file -- leaves no stamps)
    if world > 1:
        torch.distributed.barrier()  # every rank has read the old state before rank 0 writes
    if is_main:
        _begin_run_dir(out_dir, cfg, code_version, restart, start_step)

    # ============ schedules ... ============
    strength_fn = strength_function(cfg)
    lr_schedule = cosine_schedule(cfg["optim"]["lr"], cfg["optim"]["min_lr"], total_steps, cfg["optim"]["warmup_steps"])
    wd_end = cfg["optim"]["weight_decay_end"]
    wd_schedule = cosine_schedule(cfg["optim"]["weight_decay"], cfg["optim"]["weight_decay"] if wd_end is None else wd_end,
                                  total_steps, 0)
    eps_schedule = linear_warmup(attack["eps"], total_steps, attack["warmup_steps"], attack["warmup_start"])  # 1/255
    strength_schedule = np.array([strength_fn(s) for s in range(total_steps)])
    weight_schedule = np.array([
        loss_weights(s, attack["clean_weight"], dynamic_augmentation(cfg), attack["only_adversarial"])
        for s in strength_schedule
    ])  # (steps, 2): clean, adversarial
    clean_weight_schedule, adv_weight_schedule = weight_schedule[:, 0], weight_schedule[:, 1]
    if state is not None:
        _set_rng_state(state["rng"])
        log.info("resuming %s from step %d", out_dir, start_step)

    # ============ training loop ... ============
    adversarial = bool(method["adversarial"])
    log_every, ckpt_every = cfg["train"]["log_every"], cfg["train"]["checkpoint_every"]

    interactive = sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=start_step, desc=f"pretrain {out_dir.name}", unit="step",
               disable=not (is_main and interactive), dynamic_ncols=True)
    live = TrainingLive(Path(live_dir) if live_dir else out_dir / LIVE_DIR, start_step) if is_main else None
    started = time.perf_counter()
    net.train()
    tick, images_seen = time.perf_counter(), 0
    last_ckpt = start_step if state is not None else None
    for step, batch in zip(range(start_step, total_steps), loader):
        for group in optimizer.param_groups:
            group["lr"] = float(lr_schedule[step])  # a python float: checkpoints hold no numpy objects
        optimizer.param_groups[0]["weight_decay"] = float(wd_schedule[step])  # the decayed group (make_optimizer)
        images = batch["images"].to(device, non_blocking=True)  # (P, S, K, V, C, H, W), local slice
        labels = batch["label"].to(device, non_blocking=True)
        local = batch["local_images"].to(device, non_blocking=True) if "local_images" in batch else None
        try:
            # inner maximisation (input gradients only) + outer minimisation (one forward/backward)
            result = hsat_step(
                model, optimizer, images, method=method, attack=attack, eps=float(eps_schedule[step]),
                clean_weight=float(clean_weight_schedule[step]), adv_weight=float(adv_weight_schedule[step]),
                generator=_attack_generator(seed, step, rank, device),
                fast=fast, net=net, autocast=autocast, channels_last=cfg["channels_last"],
                grad_clip=cfg["optim"]["grad_clip"], labels=labels, objective=objective, local=local, step=step,
            )
        except NonFiniteLoss as exc:
            last = f"step {last_ckpt}" if last_ckpt is not None else "none written yet"
            raise HSATError(
                f"non-finite loss ({exc.value}) at step {step + 1} of {out_dir}; stopping. Last good "
                f"checkpoint: {ckpt_path} ({last}). Lower optim.lr, raise method.temperature, or set "
                "optim.grad_clip"
            ) from None
        images_seen += result.images * world

        # logging and checkpoints (rank 0 writes)
        done = step + 1
        bar.update(1)
        record: dict[str, Any] = {
            "step": done,
            "lr": float(lr_schedule[step]),
            "eps": float(eps_schedule[step]) if adversarial else 0.0,
            "strength": float(strength_schedule[step]),
            "clean_weight": float(clean_weight_schedule[step]) if adversarial else 1.0,
            "adv_weight": float(adv_weight_schedule[step]) if adversarial else 0.0,
            "loss_total": result.loss,
        }
        if done % log_every == 0 or done == total_steps:
            record.update({k: float(v) for k, v in result.losses.items()})
            # Throughput is the machine's, not the run's: the job's log line says it, the run's
            # files (log.jsonl, the curves) hold only what the same config and data reproduce.
            now = time.perf_counter()
            images_per_s = images_seen / max(now - tick, 1e-9)
            tick, images_seen = now, 0
            if is_main:
                _append_log(out_dir / LOG, record)
                live.log(record)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{record['lr']:.2e}")
                if not interactive:  # a rule's log file gets one line per logged step instead of a bar
                    log.info(progress_line(record, total_steps, start_step, time.perf_counter() - started,
                                           images_per_s=images_per_s))
        if is_main and (done % ckpt_every == 0 or done == total_steps):
            _save_checkpoint(ckpt_path, model, optimizer, done, cfg, objective.state_dict(), precision)
            last_ckpt = done
        if callback is not None:
            callback(done, record)
    bar.close()
    if live is not None:
        live.close()

    # ============ final weights ... ============
    if is_main:
        if start_step == total_steps and not ckpt_path.exists():  # pragma: no cover - defensive
            _save_checkpoint(ckpt_path, model, optimizer, total_steps, cfg, objective.state_dict(), precision)
        save_weights(objective.export_model(model), out_dir / WEIGHTS)
    if world > 1:
        torch.distributed.barrier()
    return out_dir
