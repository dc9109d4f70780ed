"""Scores -> numbers: slide/patient aggregation, accuracy, MCA, top-k, mAP, and the
slide-stratified subset the attacks run on.

Slide and patient predictions sum the patch probability vectors of the slide or patient (the
OpenSRH evaluation), then L1-normalise the sum so average precision compares like with like.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    top_k_accuracy_score,
)

from hsat.errors import HSATError

log = logging.getLogger(__name__)

LEVELS_EVAL: tuple[str, ...] = ("patch", "slide", "patient")
"""Levels at which every classifier is scored, finest first."""


def as_numpy(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)


def patch_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in % of (N, C) scores."""
    return 100.0 * float((np.asarray(scores).argmax(1) == np.asarray(labels)).mean())


def binomial_se(acc: float, n: int) -> float:
    """Standard error (percentage points) of an accuracy of `acc` % measured on n examples,
    floored at one example (100 / n) so a perfect or zero accuracy still has a width."""
    if n <= 0:
        return float("nan")
    p = min(max(acc / 100.0, 0.0), 1.0)
    return max(100.0 * math.sqrt(p * (1.0 - p) / n), 100.0 / n)


def aggregate(
    scores: np.ndarray | torch.Tensor, groups: Sequence, labels: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, list]:
    """Sum the patch probability vectors within each group (slide or patient).

    Returns (group_scores (G, C), group_labels (G,), group_keys) with groups in sorted order and
    each summed row L1-normalised (argmax and top-k are those of the plain sum). Every patch of a
    group must carry the same label.
    """
    scores = as_numpy(scores)
    labels = np.asarray(labels)
    codes, keys = pd.factorize(pd.Series(list(groups)), sort=True)
    sums = np.zeros((len(keys), scores.shape[1]))
    np.add.at(sums, codes, scores)
    totals = sums.sum(1, keepdims=True)
    sums = np.divide(sums, totals, out=np.zeros_like(sums), where=totals > 0)
    group_labels = np.full(len(keys), -1, dtype=np.int64)
    for c, y in zip(codes, labels):
        if group_labels[c] not in (-1, y):
            raise HSATError(f"group {keys[c]!r} mixes labels {group_labels[c]} and {y}; cannot aggregate")
        group_labels[c] = y
    return sums, group_labels, list(keys)


def classification_metrics(scores: np.ndarray | torch.Tensor, labels: Sequence[int], num_classes: int) -> dict[str, Any]:
    """Acc, MCA (macro recall), top-2/top-3 accuracy, macro AP (percentages) and the confusion matrix.

    MCA and mAP average over the classes present in `labels` (a class absent from the split has
    no recall and no AP).
    """
    scores = as_numpy(scores)
    labels = np.asarray(labels, dtype=np.int64)
    pred = scores.argmax(1)
    out: dict[str, Any] = {
        "acc": 100.0 * accuracy_score(labels, pred),
        "mca": 100.0 * _balanced_accuracy(labels, pred),
    }
    for k in (2, 3):
        if k >= num_classes:
            out[f"top{k}"] = 100.0
        else:
            out[f"top{k}"] = 100.0 * top_k_accuracy_score(labels, scores, k=k, labels=list(range(num_classes)))
    present = np.unique(labels)
    onehot = np.eye(num_classes)[labels][:, present]
    out["map"] = 100.0 * average_precision_score(onehot, scores[:, present], average="macro") if len(present) > 0 else float("nan")
    out["confusion"] = confusion_matrix(labels, pred, labels=list(range(num_classes)))
    return out


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected here
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, pred))


def level_metrics(
    scores: np.ndarray | torch.Tensor,
    labels: Sequence[int],
    patients: Sequence[str],
    slides: Sequence[str],
    num_classes: int,
) -> dict[str, dict[str, Any]]:
    """`classification_metrics` at patch, slide and patient level."""
    scores = as_numpy(scores)
    labels = np.asarray(labels)
    out = {"patch": classification_metrics(scores, labels, num_classes)}
    for level, groups in (("slide", slides), ("patient", patients)):
        s, y, _ = aggregate(scores, groups, labels)
        out[level] = classification_metrics(s, y, num_classes)
    return out



def stratified_subset(labels: Sequence[int], n: int | None, seed: int = 0) -> list[int] | None:
    """A deterministic class-stratified subset of n positions (sorted), or None for all.

    Each class keeps a share proportional to its size (largest remainders), at least one patch
    per class when n allows it.
    """
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return None
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    i = 0
    while take.sum() < n:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    while take.sum() > n:
        c = int(np.argmax(take))
        take[c] -= 1
    chosen: list[int] = []
    for c, t in zip(classes, take):
        members = np.flatnonzero(labels == c)
        chosen.extend(rng.permutation(members)[:t].tolist())
    return sorted(int(i) for i in chosen)


def slide_stratified_subset(labels: Sequence[Any], slides: Sequence[Any], n: int | None, seed: int = 0,
                            patients: Sequence[Any] | None = None) -> list[int] | None:
    """A deterministic subset of n positions (sorted) drawn from every slide, or None for all.

    Slide- and patient-level accuracy under attack only speak for the slides the subset holds, so
    patches are dealt round-robin: each round takes one more patch (a seeded draw within the
    slide) from every slide that has one left, until n are taken. Within a round every patient's
    first slide comes before any patient's second one, and classes take turns (a seeded order),
    so a round the budget cuts short still spreads over patients and classes. Ids are compared as
    text (the same ids as strings or numbers give the same subset). With n below the number of
    slides some slides are left out, and a warning says how many.
    """
    labels = np.asarray(labels)
    slide_ids = pd.Series(np.asarray(slides, dtype=object)).astype(str)
    patient_ids = slide_ids if patients is None else pd.Series(np.asarray(patients, dtype=object)).astype(str)
    if not len(slide_ids) == len(patient_ids) == len(labels):
        raise HSATError(f"slide-stratified subset: {len(labels)} labels, {len(slide_ids)} slide ids and "
                        f"{len(patient_ids)} patient ids; give one of each per patch")
    if n is None or n >= len(labels):
        return None
    rng = np.random.default_rng(seed)
    slide_code, _ = pd.factorize(slide_ids, sort=False)
    n_slides = int(slide_code.max()) + 1
    by_slide = np.argsort(slide_code, kind="stable")  # positions grouped by slide, in order within each
    members = np.split(by_slide, np.cumsum(np.bincount(slide_code, minlength=n_slides))[:-1])
    first = np.array([m[0] for m in members])
    members = [rng.permutation(m) for m in members]
    # The order slides are visited in each round: patients' first slides, then their second ones;
    # within that, classes in turn (a seeded order of classes and of the slides of each).
    slide_class, _ = pd.factorize(pd.Series(labels[first], dtype=object).astype(str), sort=False)
    slide_patient, _ = pd.factorize(patient_ids.iloc[first], sort=False)
    patient_turn = np.empty(n_slides, dtype=np.int64)
    for pat in range(int(slide_patient.max()) + 1):
        own = np.flatnonzero(slide_patient == pat)
        patient_turn[rng.permutation(own)] = np.arange(len(own))
    class_turn = rng.permutation(int(slide_class.max()) + 1)[slide_class]
    tiebreak = pd.Series(rng.permutation(n_slides))
    class_rank = tiebreak.groupby([patient_turn, slide_class]).rank(method="first").to_numpy()
    visit = np.lexsort((class_turn, class_rank, patient_turn))
    depth = np.empty(len(labels), dtype=np.int64)
    turn = np.empty(len(labels), dtype=np.int64)
    for t, s in enumerate(visit):
        depth[members[s]] = np.arange(len(members[s]))
        turn[members[s]] = t
    chosen = np.lexsort((turn, depth))[:n]  # round by round, slides in visiting order
    if n < n_slides:
        log.warning("attacking %d validation patches leaves %d of %d validation slides without an attacked patch: "
                    "slide- and patient-level results under attack cover the other %d (raise "
                    "evaluation.max_val_patches to at least %d to cover every slide)", n, n_slides - n, n_slides, n, n_slides)
    return sorted(int(i) for i in chosen)


def subset_coverage(slides: Sequence[Any], patients: Sequence[Any], indices: Sequence[int] | None) -> dict[str, int]:
    """How many patches, slides and patients the attacked subset `indices` (None: all) holds, and
    how many slides and patients there are: what slide- and patient-level results speak for."""
    slides = pd.Series(np.asarray(slides, dtype=object)).astype(str)
    patients = pd.Series(np.asarray(patients, dtype=object)).astype(str)
    chosen = list(range(len(slides))) if indices is None else list(indices)
    return {"patches": len(chosen), "slides": int(slides.iloc[chosen].nunique()),
            "patients": int(patients.iloc[chosen].nunique()), "slides_total": int(slides.nunique()),
            "patients_total": int(patients.nunique())}
