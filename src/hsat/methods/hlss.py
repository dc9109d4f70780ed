"""HLSS (Watawana et al., MICCAI 2024): HiDisc's hierarchy tied to language.

Per level (patient, slide, patch) a set of attributes described in text (`config/attributes/`),
embedded once by a frozen text encoder (`hsat.text`). The model projects its backbone features
into the text space (v, unit norm) and scores v against each level's attributes with a linear
head initialised from their embeddings, so at the start score j is the cosine similarity to
attribute j. The loss per level is HiDisc's SupCon on the L2-normalised scores with that level's
grouping, plus `alignment_weight` times the cross-modal term (`hsat.losses.alignment_loss`: v
against its nearest attribute embedding). `alignment_weight: 0` is the reference code's
effective objective (it computes the term with `.item()`).

Robust HLSS (`Robust(HLSS)`) crafts PGD views that maximise this loss and trains on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hsat import LEVELS
from hsat.data.manifest import class_names, read_manifest
from hsat.errors import HSATError
from hsat.losses import alignment_loss, hierarchical_loss
from hsat.methods.base import Objective
from hsat.text import check_classes, ensure_text_embeddings, load_text_embeddings


class HLSSHead(nn.Module):
    """Backbone features -> v (the MLP projection into the text dimension, unit norm) and, per
    level, one score per attribute (a bias-free linear layer on v, rows = attribute embeddings).

    `forward` returns v (what the evaluation's `head` objective attacks and the language figure
    reads); `forward_all` returns [v | patient scores | slide scores | patch scores] for the loss.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], text_dim: int, sizes: Mapping[str, int],
                 trainable: bool = True):
        super().__init__()
        from hsat.models import projection_head  # local: hsat.models imports the method heads

        self.proj = projection_head(in_dim, hidden, text_dim)
        self.text_dim = int(text_dim)
        self.sizes = {lvl: int(sizes[lvl]) for lvl in LEVELS}
        self.levels = nn.ModuleDict({lvl: nn.Linear(text_dim, self.sizes[lvl], bias=False) for lvl in LEVELS})
        for layer in self.levels.values():
            layer.weight.requires_grad_(bool(trainable))

    @torch.no_grad()
    def init_from_text(self, attributes: Mapping[str, torch.Tensor]) -> None:
        """Level heads' rows := the attribute embeddings (unit norm)."""
        for lvl in LEVELS:
            w = attributes[lvl]
            if tuple(w.shape) != tuple(self.levels[lvl].weight.shape):
                raise HSATError(f"HLSS: {lvl} attribute embeddings have shape {tuple(w.shape)}, the head "
                                f"{tuple(self.levels[lvl].weight.shape)} (a different descriptions file or encoder?)")
            self.levels[lvl].weight.copy_(F.normalize(w.float(), dim=-1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(f), dim=-1)

    def forward_all(self, f: torch.Tensor) -> torch.Tensor:
        v = self.forward(f)
        return torch.cat([v] + [self.levels[lvl](v) for lvl in LEVELS], dim=-1)


def split_outputs(z: torch.Tensor, text_dim: int, sizes: Mapping[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[v | scores...] (..., text_dim + sum sizes) -> v (..., text_dim), {level: scores (..., n)}."""
    widths = [int(text_dim)] + [int(sizes[lvl]) for lvl in LEVELS]
    if z.shape[-1] != sum(widths):
        raise HSATError(f"HLSS: model output has {z.shape[-1]} features, expected {sum(widths)}")
    parts = torch.split(z, widths, dim=-1)
    return parts[0], dict(zip(LEVELS, parts[1:]))


def hlss_loss(z: torch.Tensor, attributes: Mapping[str, torch.Tensor], levels: Sequence[str], *,
              weights: Mapping[str, float], alignment_weight: float, alignment_temperature: float,
              temperature: float = 0.07, base_temperature: float = 0.07) -> dict[str, torch.Tensor]:
    """HLSS's loss of the model's outputs z (P, S, K, V, text_dim + sum of attribute counts).

    Per level: `supcon_<level>` (HiDisc's grouping on the normalised scores), `align_<level>`;
    total = sum over `levels` of weight * (supcon + alignment_weight * align).
    """
    text_dim = next(iter(attributes.values())).shape[1]
    v, scores = split_outputs(z, text_dim, {lvl: attributes[lvl].shape[0] for lvl in LEVELS})
    out: dict[str, torch.Tensor] = {}
    total = z.new_zeros(())
    for lvl in levels:
        con = hierarchical_loss(F.normalize(scores[lvl], dim=-1), [lvl], temperature=temperature,
                                base_temperature=base_temperature)[lvl]
        align = alignment_loss(v.reshape(-1, v.shape[-1]), scores[lvl].reshape(-1, scores[lvl].shape[-1]),
                               attributes[lvl], alignment_temperature)
        out[f"supcon_{lvl}"], out[f"align_{lvl}"] = con, align
        total = total + float(weights.get(lvl, 1.0)) * (con + float(alignment_weight) * align)
    out["total"] = total
    return out


class HLSS(Objective):
    """HLSS's loss over `method.min_levels`; an attack on it maximises `method.max_levels`.

    Reads the attribute embeddings (`method.hlss.text_embeddings`) at `setup`; a fresh run's
    level heads start from them (`init_model`).
    """

    output = "hlss"

    def __init__(self, method: Mapping[str, Any]):
        super().__init__(method)
        self.cfg = dict(method.get("hlss") or {})
        for key in ("min_levels", "max_levels"):
            if not method.get(key):
                raise HSATError(f"method {method.get('name')!r}: {key} is empty; HLSS needs at least one level")
        self.attributes: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self.attributes is None:
            path = self.cfg.get("text_embeddings")
            if not path:
                raise HSATError("method.hlss.text_embeddings is not set (hsat pretrain fills it in)")
            self.attributes = load_text_embeddings(path).levels
        return self.attributes

    def complete_config(self, cfg: dict[str, Any], out_dir: Any) -> None:
        """The embeddings file (computed into the run directory when none is named), checked
        against the dataset's classes; its shape becomes method.hlss.text_dim / attributes."""
        h = cfg["method"]["hlss"]
        classes = class_names(read_manifest(cfg["data"]["manifest"], check_files=False))
        if not h.get("text_embeddings"):
            h["text_embeddings"] = str(ensure_text_embeddings(h["descriptions"], h["encoder"], Path(out_dir) / "text", classes))
        emb = load_text_embeddings(h["text_embeddings"])
        check_classes(emb, classes, f"method.hlss.text_embeddings {h['text_embeddings']}")
        h["text_dim"], h["attributes"] = emb.dim, emb.sizes
        self.cfg = dict(h)

    def setup(self, model: nn.Module, total_steps: int) -> None:
        device = next(model.parameters()).device
        self.attributes = {lvl: t.to(device) for lvl, t in self._load().items()}

    def init_model(self, model: nn.Module) -> None:
        model.head.init_from_text(self._load())

    def _loss(self, z: torch.Tensor, levels: Sequence[str]) -> dict[str, torch.Tensor]:
        m = self.method
        weight = float(self.cfg["alignment_weight"]) if m.get("alignment", True) else 0.0
        return hlss_loss(z, self._load(), levels, weights=m["level_weights"],
                         alignment_weight=weight,
                         alignment_temperature=float(self.cfg["alignment_temperature"]),
                         temperature=m["temperature"], base_temperature=m["base_temperature"])

    def loss(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._loss(z, self.method["min_levels"])

    def attack_loss(self, z: torch.Tensor) -> torch.Tensor:
        return self._loss(z, self.method["max_levels"])["total"]
