"""DINO self-distillation (Caron et al. 2021) as a method of this study, and its building blocks.

As the reference training loop defines it: the student is the trained model (backbone + `DINOHead`);
the teacher is a copy that never receives gradients and follows the student by an EMA whose
momentum rises from 0.996 to 1 on a cosine schedule; the teacher's outputs are centred (EMA of
their batch mean, momentum 0.9) and sharpened (temperature 0.04, optionally warmed up); the two
global crops go to both networks and N local crops to the student only (`data.local_crops`);
the prototype layer's gradients are dropped for the first steps. The loss is
`hsat.losses.dino_loss`.

`positives` makes it hierarchical: the teacher's target for a patch's student crops comes from
the same patch (DINO), from another patch of the same slide, or from another slide of the same
patient (the batch holds S slides x K patches per patient, so the partner is the next one).

Robust DINO (`Robust(DINO)`) crafts PGD views that maximise the DINO loss of the student's
global crops against the clean teacher targets and trains the student on them. The exported
model (`model.safetensors`) is the teacher, which the reference evaluates.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hsat.errors import HSATError
from hsat.losses import dino_loss
from hsat.methods.base import Objective


class DINOHead(nn.Module):
    """MLP (Linear-GELU-Linear-GELU-Linear) to an L2-normalised bottleneck, then a weight-normalised
    linear layer without bias onto `out_dim` prototypes whose weight norm is fixed to 1.

    The paper's scale: hidden 2048, bottleneck 256, 65,536 prototypes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be at least 1, got {nlayers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(nlayers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)  # the norm of every prototype stays 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def cancel_last_layer_gradients(head: DINOHead, step: int, freeze_steps: int) -> None:
    """Drop the prototype layer's gradients during the first `freeze_steps` optimiser steps (the
    reference: the first epoch), after the backward and before the optimiser step."""
    if step < freeze_steps:
        for p in head.last_layer.parameters():
            p.grad = None


def momentum_schedule(base: float, total_steps: int, final: float = 1.0) -> np.ndarray:
    """The teacher's EMA momentum per step: cosine from `base` (0.996) to `final` (1)."""
    steps = np.arange(total_steps)
    return final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / max(total_steps, 1)))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (the
    teacher never receives gradients); buffers (batch-norm statistics) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """EMA of the batch-mean teacher output (n_crops, B, K) -> the new center (K,); under DDP the
    batch mean is all-reduced over ranks first, so every rank keeps the same center."""
    batch = teacher_out.reshape(-1, teacher_out.shape[-1])
    total = batch.sum(0)
    count = torch.tensor(float(batch.shape[0]), device=batch.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return center * momentum + (total / count) * (1.0 - momentum)


def teacher_temperature_schedule(final: float, warmup: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Teacher temperature per step: linear from `warmup` to `final` over `warmup_steps`, then `final`."""
    temps = np.full(total_steps, float(final))
    n = min(int(warmup_steps), total_steps)
    if n > 0:
        temps[:n] = np.linspace(float(warmup), float(final), n)
    return temps


POSITIVES: tuple[str, ...] = ("patch", "slide", "patient")


def partner_targets(t: torch.Tensor, positives: str) -> torch.Tensor:
    """Teacher outputs (P, S, K, V, D) rearranged so that entry (p, s, k) holds the target of
    patch (p, s, k)'s student crops: itself (patch), the next patch of its slide (slide) or the
    same patch position of the patient's next slide (patient)."""
    if positives == "patch":
        return t
    if positives == "slide":
        if t.shape[2] < 2:
            raise HSATError("method.dino.positives: slide needs data.num_patch_samples >= 2")
        return t.roll(-1, dims=2)
    if positives == "patient":
        if t.shape[1] < 2:
            raise HSATError("method.dino.positives: patient needs data.num_slide_samples >= 2")
        return t.roll(-1, dims=1)
    raise HSATError(f"method.dino.positives must be one of {', '.join(POSITIVES)}, not {positives!r}")


def _crops_first(z: torch.Tensor) -> torch.Tensor:
    """(P, S, K, V, D) -> (V, P*S*K, D): the layout `dino_loss` takes."""
    return z.flatten(0, 2).transpose(0, 1)


class DINO(Objective):
    """DINO's loss on the student's crops against the centred, sharpened teacher.

    Stateful (teacher, center, schedules): `setup` once per run, `state_dict`/`load_state_dict`
    for checkpoints, `begin_step` before each step (teacher targets of the clean global crops),
    `after_step` after it (EMA teacher, center).
    """

    output = "embedding"  # the DINO head's prototype scores (HSATModel.normalize_head is False)
    uses_local = True

    def __init__(self, method: Mapping[str, Any]):
        super().__init__(method)
        self.cfg = dict(method.get("dino") or {})
        self.teacher: nn.Module | None = None
        self.center: torch.Tensor | None = None
        self.momentum = np.zeros(0)
        self.teacher_temp = np.zeros(0)
        self.step = 0
        self._targets: torch.Tensor | None = None
        self._teacher_raw: torch.Tensor | None = None
        self.local: torch.Tensor | None = None
        self.local_shape: tuple[int, ...] | None = None

    # ---- the run's lifetime
    def setup(self, model: nn.Module, total_steps: int) -> None:
        c = self.cfg
        self.teacher = copy.deepcopy(model)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        device = next(model.parameters()).device
        self.center = torch.zeros(int(model.embed_dim), device=device)
        self.momentum = momentum_schedule(float(c["momentum_teacher"]), total_steps)
        self.teacher_temp = teacher_temperature_schedule(float(c["teacher_temp"]), float(c["warmup_teacher_temp"]),
                                                         int(c["warmup_teacher_temp_steps"]), total_steps)

    def state_dict(self) -> dict[str, Any]:
        assert self.teacher is not None and self.center is not None, "DINO.setup first"
        return {"teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()},
                "center": self.center.detach().cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.teacher is not None, "DINO.setup first"
        self.teacher.load_state_dict(state["teacher"])
        self.center = state["center"].to(self.center.device if self.center is not None else "cpu")

    def export_model(self, model: nn.Module) -> nn.Module:
        return self.teacher if self.teacher is not None else model

    # ---- one step
    def begin_step(self, model: nn.Module, x: torch.Tensor, shape: tuple[int, ...], *, step: int,
                   embed: Callable[..., list[torch.Tensor]], autocast: Callable[[], Any],
                   local: torch.Tensor | None = None, local_shape: tuple[int, ...] | None = None) -> None:
        """Teacher outputs of the clean global crops (no gradient), kept for the losses and the center."""
        if self.teacher is None:
            raise HSATError("DINO: setup() was not called (the training loop builds the teacher)")
        self.step = int(step)
        self.local, self.local_shape = local, local_shape
        with torch.no_grad():
            (t,) = embed(self.teacher, x, shape, autocast)
        self._teacher_raw = t.detach()
        self._targets = partner_targets(self._teacher_raw, str(self.cfg["positives"]))

    def local_outputs(self, net: nn.Module, embed: Callable[..., list[torch.Tensor]],
                      autocast: Callable[[], Any]) -> torch.Tensor | None:
        """Student outputs (P, S, K, L, D) of the local crops, with gradients (None without local crops)."""
        if self.local is None or self.local_shape is None:
            return None
        (z_local,) = embed(net, self.local, self.local_shape, autocast)
        return z_local

    def _loss(self, z: torch.Tensor, z_local: torch.Tensor | None) -> torch.Tensor:
        if self._targets is None or self.center is None:
            raise HSATError("DINO: begin_step() was not called before the loss")
        student = _crops_first(z)
        if z_local is not None:
            student = torch.cat([student, _crops_first(z_local)])
        temp = float(self.teacher_temp[min(self.step, len(self.teacher_temp) - 1)])
        return dino_loss(student, _crops_first(self._targets), self.center,
                         student_temp=float(self.cfg["student_temp"]), teacher_temp=temp)

    def loss(self, z: torch.Tensor, local: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        total = self._loss(z, local)
        return {"total": total, "dino": total}

    def attack_loss(self, z: torch.Tensor) -> torch.Tensor:
        """What robust DINO's PGD maximises: the loss of the (perturbed) global crops alone."""
        return self._loss(z, None)

    def before_optimizer_step(self, model: nn.Module) -> None:
        cancel_last_layer_gradients(model.head, self.step, int(self.cfg["freeze_last_layer_steps"]))

    def after_step(self, model: nn.Module) -> None:
        assert self.teacher is not None and self._teacher_raw is not None and self.center is not None
        ema_update(self.teacher, model, float(self.momentum[min(self.step, len(self.momentum) - 1)]))
        self.center = update_center(self.center, _crops_first(self._teacher_raw), float(self.cfg["center_momentum"]))
        self._targets = self._teacher_raw = self.local = None
