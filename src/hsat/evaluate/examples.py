"""Per-example correctness of a white-box sweep, for statistics over patients.

`whitebox.csv` holds accuracies; a patient-level (hierarchical) bootstrap of the claims needs to
know which patches each model got right, and whose patches they are. One row per (condition,
classifier, attacked patch), patch level, top-1: clean (`attack=none`), PGD under every
objective and the worst case at each eps, the conditions the claims compare. The mean of
`correct` over a model's rows of one condition is exactly its `acc` in `whitebox.csv` (a test
checks it). Other attacks are left out to keep the file small: their accuracies stay in
`whitebox.csv`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd

from hsat.evaluate.worst_case import WORST_CASE, WORST_CASE_OBJECTIVE, worst_case_correct, worst_case_eps, worst_case_scores

if TYPE_CHECKING:
    from hsat.evaluate.sweep import AttackResults

EXAMPLE_COLUMNS: tuple[str, ...] = (
    "model", "method", "group", "seed", "attack", "eps", "objective", "restart", "classifier",
    "example", "patient", "slide", "label", "correct",
)
"""`example` is the patch's position in the validation split (the same patch for every model of a manifest)."""
EXAMPLE_ATTACKS: tuple[str, ...] = ("none", "pgd", WORST_CASE)


def _frame(base: Mapping[str, Any], fields: Mapping[str, Any], clf: str, correct: np.ndarray,
           res: "AttackResults") -> pd.DataFrame:
    n = len(res.labels)
    return pd.DataFrame({
        **{k: [v] * n for k, v in {**base, **fields, "classifier": clf}.items()},
        "example": res.positions, "patient": res.patients, "slide": res.slides,
        "label": np.asarray(res.labels, dtype=np.int64), "correct": np.asarray(correct, dtype=np.int8),
    })


def example_rows(res: "AttackResults", base: Mapping[str, Any]) -> pd.DataFrame:
    """Per-patch top-1 correctness of `res` (columns `EXAMPLE_COLUMNS`); `base` holds model, method, group, seed."""
    labels = np.asarray(res.labels)
    frames = []
    for clf, clean in res.clean.items():
        frames.append(_frame(base, {"attack": "none", "eps": 0.0, "objective": "none", "restart": 0}, clf,
                             np.asarray(clean).argmax(1) == labels, res))
        for spec, scores in zip(res.specs, res.adv):
            if spec.attack in EXAMPLE_ATTACKS:
                frames.append(_frame(base, {"attack": spec.attack, "eps": float(spec.eps), "objective": spec.objective,
                                            "restart": int(spec.restart)}, clf, np.asarray(scores[clf]).argmax(1) == labels, res))
        for eps in worst_case_eps(res):
            correct, _ = worst_case_correct(worst_case_scores(res, eps, clf), labels, None, k=1)
            frames.append(_frame(base, {"attack": WORST_CASE, "eps": float(eps), "objective": WORST_CASE_OBJECTIVE,
                                        "restart": 0}, clf, correct, res))
    if not frames:
        return pd.DataFrame(columns=list(EXAMPLE_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(EXAMPLE_COLUMNS)]
