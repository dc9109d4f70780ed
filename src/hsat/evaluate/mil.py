"""Weakly supervised slide classification on frozen patch features: gated attention MIL.

The slide-level protocol of Chen & Krishnan 2021 (CLAM-SB on frozen DINO features; Ilse et al.
2018's gated attention pooling): each slide is a bag of its patches' clean backbone features
(`hsat embed`), labelled by its patient's class; a small attention network learns which patches
to weigh and classifies the pooled feature. Trained on the training slides, scored on the
validation slides (accuracy, mean class accuracy, macro one-vs-rest AUC).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from hsat.errors import HSATError

MIL_COLUMNS: tuple[str, ...] = ("model", "method", "group", "seed", "classifier", "level", "n_slides",
                                "acc", "mca", "auc")


class GatedAttentionMIL(nn.Module):
    """Bag (n, d) -> class logits (C,) and attention weights (n,): Linear-ReLU, gated attention
    (tanh branch x sigmoid branch -> one score per patch, softmax over the bag), linear classifier."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128, attention: int = 64, dropout: float = 0.25):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.att_a = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh())
        self.att_b = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid())
        self.att_c = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(bag)
        weights = torch.softmax(self.att_c(self.att_a(h) * self.att_b(h)).squeeze(-1), dim=0)
        return self.classifier(weights @ h), weights


def slide_bags(features: torch.Tensor, labels: torch.Tensor, slides: Sequence[str]) -> list[tuple[str, torch.Tensor, int]]:
    """(slide, bag of its patch features, label) per slide, in sorted slide order."""
    slides = np.asarray([str(s) for s in slides])
    if len(slides) != len(features):
        raise HSATError(f"{len(features)} features but {len(slides)} slide ids")
    bags = []
    for slide in sorted(set(slides.tolist())):
        idx = np.flatnonzero(slides == slide)
        ys = set(labels[idx].tolist())
        if len(ys) != 1:
            raise HSATError(f"slide {slide!r} has patches of several labels {sorted(ys)}")
        bags.append((slide, features[idx], int(ys.pop())))
    return bags


def train_mil(bags: Sequence[tuple[str, torch.Tensor, int]], num_classes: int, *, epochs: int = 30,
              lr: float = 2e-4, weight_decay: float = 1e-5, seed: int = 0) -> GatedAttentionMIL:
    """One bag per step (CLAM's protocol), Adam, a seeded shuffle every epoch."""
    if not bags:
        raise HSATError("MIL: no training slides")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GatedAttentionMIL(int(bags[0][1].shape[1]), num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(int(epochs)):
        for i in torch.randperm(len(bags), generator=g).tolist():
            _, bag, y = bags[i]
            logits, _ = model(bag.float())
            loss = F.cross_entropy(logits[None], torch.tensor([y]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_mil(model: GatedAttentionMIL, bags: Sequence[tuple[str, torch.Tensor, int]]) -> np.ndarray:
    """Class probabilities (n_slides, C)."""
    return np.stack([torch.softmax(model(bag.float())[0], -1).numpy() for _, bag, _ in bags])


def mil_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, mean class accuracy and macro one-vs-rest AUC (over classes present), in %."""
    from sklearn.metrics import roc_auc_score

    pred = probs.argmax(1)
    acc = 100.0 * float((pred == labels).mean())
    present = sorted(set(labels.tolist()))
    mca = 100.0 * float(np.mean([(pred[labels == c] == c).mean() for c in present]))
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in present if 0 < (labels == c).sum() < len(labels)]
    return {"acc": acc, "mca": mca, "auc": 100.0 * float(np.mean(aucs)) if aucs else float("nan")}


def mil_rows(emb: Any, info: dict[str, Any], *, epochs: int = 30, lr: float = 2e-4, weight_decay: float = 1e-5,
             seed: int = 0) -> pd.DataFrame:
    """`MIL_COLUMNS` row of one model's embeddings (`hsat.evaluate.Embeddings`)."""
    idx = emb.index
    train_idx, val_idx = idx[idx["split"] == "train"], idx[idx["split"] == "val"]
    num_classes = len(emb.classes) or int(max(emb.train_labels.max(), emb.val_labels.max())) + 1
    train = slide_bags(emb.train_features, emb.train_labels, train_idx["slide"].tolist())
    val = slide_bags(emb.val_features, emb.val_labels, val_idx["slide"].tolist())
    model = train_mil(train, num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    m = mil_metrics(predict_mil(model, val), np.array([y for _, _, y in val]), num_classes)
    row = {**info, "classifier": "abmil", "level": "slide", "n_slides": len(val), **m}
    return pd.DataFrame([row], columns=list(MIL_COLUMNS))
