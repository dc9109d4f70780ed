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
    the levels the attack maximises), `reference` (supervised ceilings), `dino` (DINO and robust DINO),
    `hlss` (HLSS and robust HLSS), `encoder` (an encoder imported, not trained).
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
    uses_local = False  # loss(z, local): the student's outputs of the local crops (DINO)

    def __init__(self, method: Mapping[str, Any]):
        self.method = method

    def loss(self, z: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def attack_loss(self, z: torch.Tensor) -> torch.Tensor:
        return self.loss(z)["total"]

    def loss_of(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                local: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.uses_labels:
            return self.loss(z, labels)
        return self.loss(z, local) if self.uses_local else self.loss(z)

    def attack_loss_of(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.attack_loss(z, labels) if self.uses_labels else self.attack_loss(z)

    def training_views(self, model: torch.nn.Module, x: torch.Tensor, shape: tuple[int, ...], **kw: Any
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(clean views or None, adversarial views or None) the encoder is trained on: clean only."""
        return x, None

    # ---- stateful methods (DINO's teacher and center); no-ops for the others
    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        """Once per run, after the model is built and before any step."""

    def complete_config(self, cfg: dict[str, Any], out_dir: Any) -> None:
        """Fill in the run settings this method derives from its inputs, before the run starts and
        before its config is compared with a run to resume (HLSS: the text embeddings' shape)."""

    def init_model(self, model: torch.nn.Module) -> None:
        """A fresh run's initialisation of the method's modules, before the first step and never on
        resume (HLSS: the level heads from the attribute embeddings)."""

    def state_dict(self) -> dict[str, Any] | None:
        """The method's own state for checkpoints (tensors and plain containers), or None."""
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (resume)."""

    def export_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network written to model.safetensors: the trained model (DINO: its teacher)."""
        return model

    def begin_step(self, model: torch.nn.Module, x: torch.Tensor, shape: tuple[int, ...], **kw: Any) -> None:
        """Before the step's views are made (DINO: the teacher's targets)."""

    def local_outputs(self, net: torch.nn.Module, embed: Any, autocast: Any) -> torch.Tensor | None:
        """Outputs of extra student inputs (DINO's local crops), with gradients; None for most methods."""
        return None

    def before_optimizer_step(self, model: torch.nn.Module) -> None:
        """After the backward, before the optimiser step (DINO: drop the prototype layer's gradients)."""

    def after_step(self, model: torch.nn.Module) -> None:
        """Called after each optimiser step (no-op unless the method keeps extra state)."""

