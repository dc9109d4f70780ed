"""The validation sampling of a comparison, resampled by patient: a hierarchical bootstrap.

The attacked patches come from a few dozen validation patients, and every model is scored on the
same patches. A binomial variance over N patches treats them as independent draws and each arm
as if it had its own patches; both are wrong in opposite directions (patches of one patient go
together; a difference of two arms on shared patches is less noisy than the sum of their
variances). Resampling patients, the same draw for both arms, gets both right.

`hierarchical_bootstrap` resamples the two levels of a study: seeds (models) within each arm,
then patients within each class (the validation split is drawn class by class), keeping each
patient's patches together, and recomputes each arm's mean accuracy from the per-example
results. It gives:

- `sampling_var`: the variance of the difference over patient draws alone, every model kept (the
  validation-sampling part of the difference's variance, which `claims.t_test` adds to the seed
  part in place of the binomial term);
- `interval` and `p_value`: the percentile interval and two-sided p-value of the full two-level
  bootstrap. With 3 seeds an arm has 10 distinct seed draws and the bootstrap's seed variance is
  (n - 1)/n of the sample's: on its own it is too narrow, which is why the claims ask it to agree
  with Welch's t, not replace it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from hsat.errors import HSATError
from hsat.io import read_tidy

N_BOOT = 2000
"""Bootstrap draws per comparison: percentiles of a 95 % interval to about +-0.5 % coverage."""
BOOT_SEED = 0
"""Every comparison draws from the same seed, so the claims are reproducible byte for byte."""


@dataclass(frozen=True)
class PerExample:
    """The per-example correctness (0-1) of an arm's models, one row per model, on `examples`,
    with the patient and class of each example."""

    correct: np.ndarray  # (models, examples)
    examples: tuple[int, ...]
    patients: tuple[str, ...]
    strata: tuple[str, ...]


def per_example(examples: pd.DataFrame | None, models: Sequence[str], accs: Sequence[float], *, attack: str,
                eps: float, classifier: str, objective: str | None = None) -> PerExample | None:
    """The arm of `models` in `examples` (the per-example CSVs, `hsat.evaluate.examples`) at one
    condition; None when a model has no rows there (models evaluated before the file existed, or
    rows the evaluation does not keep). Restarts of one attack average per example, as their
    accuracies do in `whitebox.csv`. Each model's mean must be its accuracy there (`accs`, %):
    files of another evaluation are refused."""
    if examples is None or examples.empty or not len(models):
        return None
    rows = examples[(examples["attack"] == attack) & (examples["eps"].astype(float) == float(eps))
                    & (examples["classifier"] == classifier) & examples["model"].isin(list(models))]
    if objective is not None and attack != "none":
        rows = rows[rows["objective"] == objective]
    if rows.empty or set(rows["model"].astype(str)) != set(map(str, models)):
        return None
    table = rows.pivot_table(index="model", columns="example", values="correct", aggfunc="mean")
    if table.isna().any().any():
        return None  # the models were not scored on the same patches
    table = table.loc[list(models)]
    for model, acc in zip(models, accs):
        got = 100.0 * float(table.loc[model].mean())
        if abs(got - float(acc)) > 1e-3:
            raise HSATError(f"per-example results of {model} ({attack}, eps {eps:g}, {classifier}) average {got:.4f} % "
                            f"but whitebox.csv says {float(acc):.4f} %: they come from different evaluations (rerun "
                            "`hsat evaluate --examples` for this model)")
    first = rows.drop_duplicates("example").set_index("example").loc[table.columns]
    return PerExample(table.to_numpy(dtype=float), tuple(int(e) for e in table.columns),
                      tuple(first["patient"].astype(str)), tuple(first["label"].astype(str)))


def read_examples(paths: Sequence[str]) -> pd.DataFrame | None:
    """The per-example CSVs of a study as one frame (None when none is given)."""
    frames = [read_tidy(p) for p in paths]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else None


def _patient_codes(patients: Sequence[str], strata: Sequence[str] | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(patient index of each example, the patient indices of each stratum); a patient's stratum is
    its first example's. A stratum of one patient cannot be resampled (it would always draw that
    patient, and the bootstrap would see no sampling noise): then all patients form one stratum."""
    names, codes = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    everyone = [np.arange(len(names))]
    if strata is None:
        return codes, everyone
    first = pd.Series(np.asarray(strata, dtype=str)).groupby(codes).first()
    groups = [np.asarray(idx) for _, idx in first.groupby(first.values).groups.items()]
    return codes, groups if min(len(g) for g in groups) > 1 else everyone


def patient_weights(n_patients: int, strata: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_patients) multiplicities of a stratified resampling of patients with replacement:
    each stratum keeps its number of patients."""
    w = np.zeros((n_boot, n_patients))
    rows = np.arange(n_boot)[:, None]
    for members in strata:
        draw = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        np.add.at(w, (np.broadcast_to(rows, draw.shape), draw), 1.0)
    return w


def hierarchical_bootstrap(a: np.ndarray, b: np.ndarray, patients: Sequence[str], strata: Sequence[str] | None = None,
                           *, null: float = 0.0, alpha: float = 0.05, n_boot: int = N_BOOT,
                           seed: int = BOOT_SEED) -> dict[str, Any]:
    """Mean accuracy of arm a minus arm b (points), resampled by seed, then by patient.

    `a` (models_a, N) and `b` (models_b, N): per-example correctness (0-1) on the same N examples,
    of `patients` (N,), stratified by `strata` (N,; e.g. the class, None: one stratum). Returns
    estimate, interval (percentile, 1 - alpha), p_value (two-sided, against `null`), sampling_var
    (the difference's variance over patient draws alone, every model kept; points^2), n_boot,
    patients and seed.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape[1] != b.shape[1] or a.shape[1] != len(patients):
        raise HSATError(f"hierarchical_bootstrap: arms of {a.shape[1]} and {b.shape[1]} examples, {len(patients)} patients")
    codes, groups = _patient_codes(patients, strata)
    n_patients = int(codes.max()) + 1
    count = np.bincount(codes, minlength=n_patients).astype(float)
    sums = [np.stack([np.bincount(codes, weights=row, minlength=n_patients) for row in arm]) for arm in (a, b)]
    rng = np.random.default_rng(seed)
    w = patient_weights(n_patients, groups, n_boot, rng)
    accs = [100.0 * (w @ s.T) / (w @ count)[:, None] for s in sums]  # (n_boot, models) per arm
    over_patients = accs[0].mean(1) - accs[1].mean(1)
    seeds = [np.take_along_axis(acc, rng.integers(0, acc.shape[1], size=acc.shape), axis=1).mean(1) for acc in accs]
    diff = seeds[0] - seeds[1]
    lo, hi = np.quantile(diff, [alpha / 2, 1 - alpha / 2])
    below, above = (np.sum(diff <= null) + 1) / (n_boot + 1), (np.sum(diff >= null) + 1) / (n_boot + 1)
    return {
        "estimate": float(100.0 * (a.mean() - b.mean())),
        "interval": [float(lo), float(hi)],
        "p_value": float(min(1.0, 2 * min(below, above))),
        "sampling_var": float(over_patients.var(ddof=1)),
        "n_boot": int(n_boot),
        "patients": n_patients,
        "seed": int(seed),
    }


def paired(a: PerExample | None, b: PerExample | None) -> bool:
    """Whether two arms were scored on the same examples (the bootstrap resamples them together)."""
    return a is not None and b is not None and a.examples == b.examples


def bootstrap_arms(a: Mapping[str, Any], b: Mapping[str, Any], null: float = 0.0, alpha: float = 0.05) -> dict[str, Any] | None:
    """`hierarchical_bootstrap` of two claim arms that carry `per_example`; None when either lacks it."""
    pa, pb = a.get("per_example"), b.get("per_example")
    if not paired(pa, pb):
        return None
    return hierarchical_bootstrap(pa.correct, pb.correct, pa.patients, pa.strata, null=null, alpha=alpha)
