"""The per-example worst case over a sweep: robust only if correct under every attack.

At each eps, a patch counts as robust for a classifier only when the clean patch and its
adversarial version under every attack and objective of the sweep at that eps or below (an
example found at 4/255 lies in the 8/255 ball too; AutoAttack included where it ran) are all
classified correctly. A slide or patient counts as robust only when its aggregated prediction is
correct under every way of choosing, patch by patch, one of those versions: patches are attacked
one by one, so an attacker may give each its own worst one (`adversarial_mixtures` finds the
worst choice exactly for top-1). The rows go to `whitebox.csv` with `attack=worst_case`,
`objective=all`; `steps` holds the most attack steps among the combined specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from hsat.evaluate.metrics import LEVELS_EVAL, aggregate

if TYPE_CHECKING:
    from hsat.evaluate.sweep import AttackResults

WORST_CASE = "worst_case"
WORST_CASE_OBJECTIVE = "all"
NOT_ATTACKS = ("noise",)
"""Specs that are not attacks (the noise baseline of the sanity checks) never enter the worst case."""


def _topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(1)


def adversarial_mixtures(score_list: Sequence[np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
    """The per-patch choices among `score_list` (each (N, C)) an attacker of sum-aggregated groups
    would make: for each class c, every patch takes the version with the lowest (true-class score
    - class-c score). A group's margin between its class and c is a sum over its patches, so this
    choice minimises it over all combinations: a group is top-1 correct under every combination
    if and only if it is under each of these C arrays."""
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in score_list])  # (A, N, C)
    labels = np.asarray(labels)
    rows = np.arange(stack.shape[1])
    true = stack[:, rows, labels]  # (A, N)
    return [stack[(true - stack[:, :, c]).argmin(0), rows] for c in range(stack.shape[2])]


def worst_case_correct(
    score_list: Sequence[np.ndarray], labels: np.ndarray, groups: Sequence | None = None, k: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(correct (G,), group labels (G,)): correct in the top k under every score array of
    `score_list` (each (N, C) patch scores), per patch or, with `groups`, per aggregated group,
    where the arrays also include every patch-by-patch mixture of `adversarial_mixtures`."""
    labels = np.asarray(labels)
    if groups is not None and len(score_list) > 1:
        score_list = [*score_list, *adversarial_mixtures(score_list, labels)]
    correct = None
    group_labels = labels
    for scores in score_list:
        if groups is not None:
            scores, group_labels, _ = aggregate(scores, groups, labels)
        ok = _topk_correct(np.asarray(scores), np.asarray(group_labels), k)
        correct = ok if correct is None else correct & ok
    if correct is None:
        raise ValueError("worst case over no score arrays")
    return correct, np.asarray(group_labels)


def mean_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the fraction correct (MCA), in %."""
    classes = np.unique(labels)
    return 100.0 * float(np.mean([correct[labels == c].mean() for c in classes]))


def worst_case_eps(res: "AttackResults") -> list[float]:
    """The eps values a worst case is formed at: every eps an attack (not the noise baseline) ran at."""
    return sorted({spec.eps for spec in res.specs if spec.attack not in NOT_ATTACKS})


def worst_case_scores(res: "AttackResults", eps: float, clf: str) -> list[np.ndarray]:
    """The score arrays classifier `clf`'s worst case at `eps` combines: clean, then every attack
    at that eps or below."""
    return [res.clean[clf]] + [scores[clf] for spec, scores in zip(res.specs, res.adv)
                               if spec.attack not in NOT_ATTACKS and spec.eps <= eps]


def worst_case_rows(res: "AttackResults") -> list[dict[str, Any]]:
    """Worst-case rows (without the model identity columns) for every eps and classifier of `res`."""
    rows = []
    attacked = [(spec, scores) for spec, scores in zip(res.specs, res.adv) if spec.attack not in NOT_ATTACKS]
    for eps in worst_case_eps(res):
        at_eps = [(spec, scores) for spec, scores in attacked if spec.eps <= eps]
        steps = max(spec.steps for spec, _ in at_eps)
        for clf in res.clean:
            score_list = worst_case_scores(res, eps, clf)
            for level in LEVELS_EVAL:
                groups = None if level == "patch" else (res.slides if level == "slide" else res.patients)
                correct, labels = worst_case_correct(score_list, res.labels, groups, k=1)
                top = {k: worst_case_correct(score_list, res.labels, groups, k=k)[0] for k in (2, 3)}
                rows.append({
                    "attack": WORST_CASE, "eps": float(eps), "steps": int(steps), "objective": WORST_CASE_OBJECTIVE,
                    "classifier": clf, "level": level, "acc": 100.0 * float(correct.mean()),
                    "mca": mean_class_accuracy(correct, labels),
                    "top2": 100.0 * float(top[2].mean()), "top3": 100.0 * float(top[3].mean()),
                    "map": float("nan"),
                })
    return rows
