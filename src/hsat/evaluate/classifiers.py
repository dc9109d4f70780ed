"""The classifiers scored on frozen backbone features: weighted kNN, its differentiable soft copy
(the adaptive attack's target), and the linear probe.

Both classifiers read the *backbone* features (before the projection head), as HiDisc/HSAT do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from hsat.errors import HSATError

CLASSIFIERS: tuple[str, ...] = ("knn", "linear")
"""Classifier names of `evaluation.whitebox.classifiers` and the `classifier` column."""


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores (N, C) as in the HiDisc/InstDisc evaluation.

    Cosine similarity of the L2-normalised query to the L2-normalised bank; the k most similar
    bank entries (k clipped to the bank size) vote with weight exp(sim / temperature); votes are
    summed per class and each row is L1-normalised. Queries are processed in batches so memory
    stays at batch_size x bank size.
    """
    if bank.shape[0] == 0:
        raise HSATError("kNN bank is empty (no training features)")
    k = min(int(k), bank.shape[0])
    bank_n = F.normalize(bank.float(), dim=1)
    labels = bank_labels.to(bank.device).long()
    out = []
    for start in range(0, query.shape[0], batch_size):
        q = F.normalize(query[start : start + batch_size].float().to(bank.device), dim=1)
        sim = q @ bank_n.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=bank.device, dtype=weights.dtype)
        scores.scatter_add_(1, labels[top_idx], weights)
        out.append(F.normalize(scores, p=1, dim=1))
    if not out:
        return torch.zeros(0, num_classes)
    return torch.cat(out)


class SoftKNN(nn.Module):
    """A differentiable copy of `knn_predict` for the adaptive attack (Tramèr et al. 2020).

    The hard top-k is replaced by a softmax over the similarities to the whole bank at the same
    temperature: log p(c | f) = logsumexp_{j in c}(sim_j / T) - logsumexp_j(sim_j / T). With
    T = 0.07 the nearest neighbours dominate as in the hard vote, but every bank entry keeps a
    gradient, so PGD can pull a patch toward another class's neighbours even when all k hard
    neighbours share its label (where the hard vote's gradient is zero).
    """

    def __init__(self, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, temperature: float = 0.07):
        super().__init__()
        if bank.shape[0] == 0:
            raise HSATError("kNN bank is empty (no training features)")
        labels = bank_labels.long().to(bank.device)
        self.register_buffer("bank", F.normalize(bank.detach().float(), dim=1))
        # One boolean mask per class present in the bank; an absent class gets log-probability -inf.
        self.register_buffer("masks", torch.stack([labels == c for c in range(num_classes)]))
        self.register_buffer("labels", labels)
        self.temperature = float(temperature)
        self.num_classes = int(num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log class probabilities (B, C)."""
        sim = F.normalize(features.float(), dim=1) @ self.bank.T / self.temperature
        neg_inf = torch.finfo(sim.dtype).min
        per_class = torch.stack(
            [torch.logsumexp(sim.masked_fill(~m, neg_inf), dim=1) for m in self.masks], dim=1
        )
        return per_class - torch.logsumexp(per_class, dim=1, keepdim=True)


class KNNVote(nn.Module):
    """features -> the kNN vote's log class scores, with the soft kNN's gradient (BPDA: Athalye
    et al. 2018's forward through the true classifier, backward through a differentiable
    approximation).

    The forward value is the log of `knn_predict`'s scores (k nearest, weight exp(sim / T) at the
    kNN's `temperature`), so every decision an attack takes from it is the decision of the kNN
    that is scored: AutoAttack and torchattacks' APGD attack only the examples the kNN classifies
    correctly and keep an adversarial image only where the kNN is fooled (the soft kNN's own
    decisions differ on borderline examples, and there an AutoAttack of the soft kNN returned the
    clean image that the kNN scores correct). The gradient is `soft`'s, over the whole bank at its
    own temperature: the hard vote's is zero wherever all k neighbours share a label.
    """

    def __init__(self, soft: SoftKNN, k: int, temperature: float):
        super().__init__()
        self.soft = soft
        self.k = int(k)
        self.temperature = float(temperature)
        self.num_classes = soft.num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        soft = self.soft(features)
        with torch.no_grad():
            sim = F.normalize(features.detach().float(), dim=1) @ self.soft.bank.T
            top_sim, top_idx = sim.topk(min(self.k, sim.shape[1]), dim=1)
            votes = torch.zeros_like(soft).scatter_add_(1, self.soft.labels[top_idx], (top_sim / self.temperature).exp())
            # a class without a vote gets a large negative finite score (APGD's DLR loss sorts them)
            vote = F.normalize(votes, p=1, dim=1).clamp_min(1e-30).log()
        return soft + (vote - soft).detach()


class LinearProbe(nn.Module):
    """One affine map on frozen backbone features: standardise, then nn.Linear.

    The standardisation constants are buffers, so the probe stays a single differentiable affine
    map that a white-box attack can back-propagate through.
    """

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        self.linear = nn.Linear(num_features, num_classes)

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.scale)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> LinearProbe:
    """Fit a `LinearProbe` by full-batch AdamW on cross-entropy (deterministic on CPU)."""
    features = features.detach().float().cpu()
    labels = labels.detach().long().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(features.shape[1], num_classes)
    probe.mean.copy_(features.mean(0))
    probe.scale.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
    opt = torch.optim.AdamW(probe.linear.parameters(), lr=lr, weight_decay=weight_decay)
    probe.train()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(probe(features), labels)
        loss.backward()
        opt.step()
    probe.eval()
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


def load_probe(path: str | Path) -> LinearProbe:
    state = load_file(str(path))
    weight = state["linear.weight"]
    probe = LinearProbe(weight.shape[1], weight.shape[0])
    probe.load_state_dict(state)
    probe.eval()
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


def classify(
    features: torch.Tensor,
    probe: nn.Module | None,
    bank: tuple[torch.Tensor, torch.Tensor] | None,
    classifiers: Sequence[str],
    num_classes: int,
    knn: Mapping[str, float],
    head: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Class scores (N, C) on CPU of each named classifier; `knn` holds k and temperature;
    `head` is the model's own classification head (classifier `head`, supervised methods)."""
    out = {}
    for clf in classifiers:
        if clf == "knn":
            if bank is None:
                raise HSATError("classifier knn needs a training bank")
            out[clf] = knn_predict(features, bank[0], bank[1], num_classes, k=knn["k"], temperature=knn["temperature"]).cpu()
        elif clf == "linear":
            if probe is None:
                raise HSATError("classifier linear needs a linear probe")
            with torch.no_grad():
                out[clf] = probe(features).softmax(1).float().cpu()
        elif clf == "head":
            if head is None:
                raise HSATError("classifier head needs a model with a classification head (the supervised methods)")
            with torch.no_grad():
                out[clf] = head(features).softmax(1).float().cpu()
        else:
            raise HSATError(f"unknown classifier {clf!r} ({', '.join(CLASSIFIERS)}, head)")
    return out
