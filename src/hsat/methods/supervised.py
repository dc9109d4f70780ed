"""The reference classifiers: supervised cross-entropy (the non-robust ceiling) and, wrapped in
`Robust`, PGD adversarial training on it (Madry et al. 2018; the robust ceiling).

Trained on the same hierarchical batches, backbone and crops as HiDisc/HSAT, with the class of
each view's patient as its label, through the model's own classification head
(`HSATModel.classifier`, which the evaluation scores as classifier `head`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsat.errors import HSATError
from hsat.methods.base import Objective


def view_labels(labels: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """Patient labels (P,) repeated over every view of the (P, S, K, V) batch, flattened."""
    if labels is None:
        raise HSATError("the supervised methods need the batch's labels")
    return labels.view(-1, *([1] * (len(shape) - 1))).expand(*shape).reshape(-1)


class Supervised(Objective):
    """Mean cross-entropy of the classification head's logits over every view; the attack (in
    supervised_at) maximises the same cross-entropy."""

    output = "logits"
    needs_classifier = True
    uses_labels = True

    def loss(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        y = view_labels(labels, tuple(z.shape[:4])).to(z.device)
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), y)
        return {"total": ce, "ce": ce}

    def attack_loss(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss(z, labels)["total"]
