"""HiDisc (Cheng et al., CVPR 2023): supervised-contrastive loss at the patient, slide and patch
levels of the hierarchy (views of a patch, patches of a slide, slides of a patient are positives)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from hsat.errors import HSATError
from hsat.losses import hierarchical_loss
from hsat.methods.base import Objective


def levels_kw(method: Mapping[str, Any]) -> dict[str, Any]:
    return dict(weights=method["level_weights"], temperature=method["temperature"],
                base_temperature=method["base_temperature"])


class HiDisc(Objective):
    """The hierarchical loss over `method.min_levels`; an attack on it maximises `method.max_levels`."""

    def __init__(self, method: Mapping[str, Any]):
        super().__init__(method)
        for key in ("min_levels", "max_levels"):
            if not method.get(key):
                raise HSATError(f"method {method.get('name')!r}: {key} is empty; HiDisc needs at least one level")

    def loss(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return hierarchical_loss(z, self.method["min_levels"], **levels_kw(self.method))

    def attack_loss(self, z: torch.Tensor) -> torch.Tensor:
        return hierarchical_loss(z, self.method["max_levels"], **levels_kw(self.method))["total"]
