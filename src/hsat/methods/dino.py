"""DINO's building blocks (Caron et al. 2021), as its reference training loop defines them.

The projection head, the teacher's EMA of the student, the center of the teacher's outputs and
the momentum schedule. The loss is `hsat.losses.dino_loss`. Not yet a registered method: the
training integration (student/teacher pair, multi-crop, hierarchical positives) is issue 11's
next step; these parts are tested on their own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
