"""Supervised-contrastive loss (Khosla et al. 2020) and its patient/slide/patch hierarchy (HiDisc);
DINO's self-distillation cross-entropy (Caron et al. 2021).

All are plain functions of tensors. The hierarchy is only a regrouping of the same embeddings:
patient-level positives are every view of every patch of the patient, slide-level positives
every view of every patch of the slide, patch-level positives the views of one patch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from hsat import LEVELS


def supcon_loss(z: torch.Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> torch.Tensor:
    """SupCon loss, contrast mode "all", for `z` of shape (G, V, D), rows L2-normalised.

    Each of the G*V embeddings is an anchor; its contrast set is every other embedding; its
    positives are the other V-1 members of its group. The loss is
    -(temperature / base_temperature) * mean over anchors of the mean log-probability of its
    positives. Computed in float32 with log-sum-exp, so it is stable at small temperatures.
    """
    if z.dim() != 3:
        raise ValueError(f"supcon_loss expects z of shape (groups, views, dim), got {tuple(z.shape)}")
    groups, views, dim = z.shape
    if views < 2:
        raise ValueError(f"supcon_loss needs at least 2 mutually positive embeddings per group, got {views}")
    if not temperature > 0 or not base_temperature > 0:
        raise ValueError(f"temperatures must be positive, got {temperature} and {base_temperature}")
    n = groups * views
    flat = z.reshape(n, dim).float()
    logits = flat @ flat.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    # log p(j | i) = s_ij - log sum_{k != i} exp(s_ik); logsumexp subtracts the row max itself.
    log_norm = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    log_prob = logits - log_norm
    group = torch.arange(groups, device=z.device).repeat_interleave(views)
    positive = (group[:, None] == group[None, :]) & ~self_mask
    mean_log_prob_pos = (log_prob * positive).sum(1) / (views - 1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def hierarchical_loss(
    z: torch.Tensor,
    levels: Sequence[str] = LEVELS,
    weights: Mapping[str, float] | None = None,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> dict[str, torch.Tensor]:
    """Patient, slide and patch SupCon terms of `z` shaped (P, S, K, V, D), plus their weighted sum.

    Returns `{level: loss for each requested level, "total": sum of weights[level] * loss}`;
    weights default to 1.0 per level.
    """
    if z.dim() != 5:
        raise ValueError(
            f"hierarchical_loss expects z of shape (patients, slides, patches, views, dim), got {tuple(z.shape)}"
        )
    levels = list(levels)
    unknown = [lvl for lvl in levels if lvl not in LEVELS]
    if not levels or unknown or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS} without repeats, got {levels}")
    weights = dict(weights or {})
    bad = [k for k in weights if k not in LEVELS]
    if bad:
        raise ValueError(f"weights has unknown levels {bad}; allowed: {LEVELS}")
    p, s, k, v, d = z.shape
    groupings = {
        "patient": (p, s * k * v),
        "slide": (p * s, k * v),
        "patch": (p * s * k, v),
    }
    out: dict[str, torch.Tensor] = {}
    for lvl in levels:
        g, members = groupings[lvl]
        if members < 2:
            raise ValueError(f"the {lvl} level needs at least 2 embeddings per {lvl}; z has shape {tuple(z.shape)}")
        out[lvl] = supcon_loss(z.reshape(g, members, d), temperature, base_temperature)
    out["total"] = sum(float(weights.get(lvl, 1.0)) * out[lvl] for lvl in levels)
    return out


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """DINO's loss: cross-entropy from the centred, sharpened teacher to the student, over crop pairs.

    `student_out` (n_student_crops, B, K) and `teacher_out` (n_teacher_crops, B, K) are the heads'
    logits; the student's first n_teacher_crops crops are the global crops the teacher saw, so the
    pairs (teacher crop i, student crop i) compare a crop with itself and are skipped. Every other
    (teacher crop, student crop) pair counts once; the loss is the mean over those pairs of the
    batch-mean cross-entropy between softmax((t - center) / teacher_temp) (no gradient) and
    log_softmax(s / student_temp). The center's EMA update is the caller's (it must not see the
    loss's graph).
    """
    if student_out.ndim != 3 or teacher_out.ndim != 3 or student_out.shape[1:] != teacher_out.shape[1:]:
        raise ValueError(
            f"dino_loss: expected student (S, B, K) and teacher (T, B, K) with the same B, K; "
            f"got {tuple(student_out.shape)} and {tuple(teacher_out.shape)}"
        )
    n_s, n_t = student_out.shape[0], teacher_out.shape[0]
    if n_t > n_s or n_s < 2:
        raise ValueError(f"dino_loss: the student needs at least the teacher's {n_t} crops and 2 in all; got {n_s}")
    targets = torch.softmax((teacher_out - center) / teacher_temp, dim=-1).detach()  # (T, B, K)
    log_probs = torch.log_softmax(student_out / student_temp, dim=-1)  # (S, B, K)
    # (T, S) matrix of batch-mean cross-entropies; the diagonal (the same crop) is left out.
    ce = -torch.einsum("tbk,sbk->ts", targets, log_probs) / student_out.shape[1]
    keep = ~torch.eye(n_t, n_s, dtype=torch.bool, device=ce.device)
    return ce[keep].mean()


def symmetric_kl(a: torch.Tensor, b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of KL(p_a || p_b) + KL(p_b || p_a), p_x = softmax(x / temperature) over the
    last dimension; gradients flow into both arguments (detach one to make it a target)."""
    if a.shape != b.shape:
        raise ValueError(f"symmetric_kl: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    la = torch.log_softmax(a.float() / temperature, dim=-1)
    lb = torch.log_softmax(b.float() / temperature, dim=-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    return (kl_ab + kl_ba).mean()


def alignment_loss(v: torch.Tensor, scores: torch.Tensor, attributes: torch.Tensor,
                   temperature: float = 0.1) -> torch.Tensor:
    """HLSS's cross-modal term: each visual representation v (N, D) against the embedding of its
    nearest attribute, attributes (A, D), nearest = argmax of its scores (N, A); symmetric KL
    between the softmaxed vectors. The attribute embeddings are fixed targets; the gradient goes
    into v (the reference code takes this term with `.item()`, so it never trains anything)."""
    if v.ndim != 2 or scores.ndim != 2 or scores.shape[0] != v.shape[0] or attributes.shape != (scores.shape[1], v.shape[1]):
        raise ValueError(f"alignment_loss: v (N, D), scores (N, A), attributes (A, D); got "
                         f"{tuple(v.shape)}, {tuple(scores.shape)}, {tuple(attributes.shape)}")
    nearest = attributes.to(v.device, torch.float32)[scores.detach().argmax(-1)]
    return symmetric_kl(v, nearest.detach(), temperature)
