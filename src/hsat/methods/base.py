"""What every method is: a registry entry (name, display label, table role, the settings it
fixes) and an objective (its loss on a batch of views, what an attack on it maximises, what it
updates after the optimiser step).

The training loop (`hsat.train.hsat_step`) only asks the objective for its training views and
its loss; it never knows which method it trains. "Robust X" (`hsat.methods.robust.Robust`) wraps
any objective X: PGD views that maximise X's attack loss, X's loss minimised on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class MethodEntry:
    """A named method: `defaults` are the method-section keys it fixes (user keys override them).

    `role` places it in the tables: `baseline` (the non-adversarial method the claims compare
    against), `method` (the paper's), `level` (Table 3: the hierarchy level), `lmax` (Table 4:
    the levels the attack maximises), `reference` (supervised ceilings).
    """

    name: str
    label: str
    role: str
    defaults: Mapping[str, Any] = field(default_factory=dict)


class Objective:
    """A method's loss on the model's outputs z (P, S, K, V, D) for a hierarchical batch.

    `output` names what z is: the L2-normalised contrastive embedding ("embedding") or the
    classification head's logits ("logits", for which the model needs `model.num_classes`:
    `needs_classifier`). Subclasses define `loss` (a dict with "total", which the encoder
    minimises, and one entry per term for the logs) and may define `attack_loss` (what a robust
    wrapper's PGD maximises; the total loss by default) and `after_step` (e.g. an EMA teacher
    update). An objective with `uses_labels` takes `loss(z, labels)` and `attack_loss(z, labels)`,
    labels (P,) being the patients' class ids gathered over ranks like z; the training loop calls
    `loss_of` / `attack_loss_of`, which pass them only there.
    """

    adversarial = False
    output = "embedding"
    needs_classifier = False
    uses_labels = False

    def __init__(self, method: Mapping[str, Any]):
        self.method = method

    def loss(self, z: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def attack_loss(self, z: torch.Tensor) -> torch.Tensor:
        return self.loss(z)["total"]

    def loss_of(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.loss(z, labels) if self.uses_labels else self.loss(z)

    def attack_loss_of(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.attack_loss(z, labels) if self.uses_labels else self.attack_loss(z)

    def training_views(self, model: torch.nn.Module, x: torch.Tensor, shape: tuple[int, ...], **kw: Any
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(clean views or None, adversarial views or None) the encoder is trained on: clean only."""
        return x, None

    def after_step(self, model: torch.nn.Module) -> None:
        """Called after each optimiser step (no-op unless the method keeps extra state)."""

