"""Attack sanity checks (Carlini et al. 2019, Tramèr et al. 2020): each can fail, one function each.

A robustness number is only as good as the attack behind it. Every check below compares
accuracies that an honest attack orders one way and a broken one (returns x unchanged, follows
a masked gradient, climbs the wrong way) orders the other; `tests/test_sanity.py` feeds each one
such a broken attack and asserts that it fails. Tolerances are the noise of the estimate — z
binomial standard errors of an accuracy on n patches (`binomial_se`) — not fixed points; a
failing check is reported in `passed`, never raised.

Every row is a check that can fail: a row that holds by construction would pad the count that
the claims report (`hsat.report.claims.attack_quality`).

Per model (`sanity_checks`, patch level):
- `steps`, `steps_feature_knn`: accuracy must not rise with more PGD steps (linear_ce scored by
  the probe; the paper's feature objective scored by kNN), starting from clean accuracy: the
  first point must not lie above clean;
- `converged`: PGD with twice the sweep's steps under the label attack (scored by the probe)
  and the adaptive `knn_soft` (scored by kNN) may lie at most `converge_gap` points below PGD
  with the sweep's steps (more steps that keep finding adversarial examples mean the sweep's
  numbers are upper bounds: Carlini et al.'s "iterations until convergence");
- `restarts`: R random restarts of PGD; the worst case over them must not sit more than
  `restart_gap` points below a single run (a single run was too weak);
- `eps`: accuracy must not rise with eps, starting from clean accuracy;
- `large_eps_label`, `large_eps_feature`: at eps `large_eps` (64/255) the label attack (scored
  by the probe) and the feature attack (scored by kNN) must reach chance + `chance_margin`;
- `noise`: uniform noise in the same ball must hurt at most half as much as PGD (at the
  white-box eps values and at `large_eps`, where an attack that is no stronger than noise shows);
- `precision` (when `evaluation.attack_precision` crafts in bf16): PGD under `feature`,
  `linear_ce` and `knn_soft` crafted in bf16 must be as strong as the same PGD crafted in fp32
  (accuracy <= fp32 accuracy + noise), so low-precision gradients do not weaken the sweep. Like
  every per-model check it runs on `evaluation.sanity.models` only (the default study: seed 0 of
  each non-robust/robust pair, 6 of the 31 models, while every model's sweep crafts in bf16 where
  the CPU runs it natively). Not on every model: as a sanity job per model it costs a job start,
  the model's loading and six PGD runs, roughly 15-25 s each, 400-600 job-seconds (3-5 minutes on
  2 cores) over the other 25 models; `attack_quality` names the models it covered, and
  docs/workflow.md says what would make it complete.
Per study (`study_checks`, from the result CSVs):
- `above_clean`: no attack row of any model may exceed its clean accuracy by more than the noise
  (patch level; the ABMIL classifier's bag attacks at slide level, n = validation slides); not
  the rows that cannot exceed clean by construction (`cannot_exceed_clean`: the worst case,
  which counts an example only when its clean prediction is correct too, and AutoAttack scored
  by the classifier whose decisions it follows, the probe's by the probe and the kNN's by the
  kNN, as it keeps the clean image wherever it fails);
- `converged` of the ABMIL bag attack (with `evaluation.mil.converged`): slide accuracy under
  bag PGD with twice the steps may lie at most `converge_gap` points below the sweep's steps;
- `whitebox_vs_transfer`: white-box accuracy <= transferred accuracy for the same target and eps.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn
from torch.utils.data import Dataset

from hsat.config import resolve_evaluation
from hsat.evaluate.classifiers import LinearProbe
from hsat.evaluate.metrics import binomial_se, patch_accuracy
from hsat.evaluate.mil import MIL_CLASSIFIER, MIL_LABEL_OBJECTIVE
from hsat.evaluate.sweep import (AUTOATTACK_OBJECTIVE, AttackSpec, attack_subset, parse_knn_objective, restart_specs,
                                 run_attacks, sweep_alpha)
from hsat.evaluate.worst_case import WORST_CASE
from hsat.precision import effective_precision

log = logging.getLogger(__name__)

SANITY_COLUMNS: tuple[str, ...] = (
    "model", "check", "param", "value", "acc", "passed",
    "attack", "eps", "steps", "objective", "classifier", "criterion",
)


def _row(model: str, check: str, param: str, value: Any, acc: float, passed: bool, spec: AttackSpec | None,
         classifier: str, criterion: str) -> dict[str, Any]:
    return {"model": model, "check": check, "param": param, "value": value, "acc": float(acc), "passed": bool(passed),
            "attack": spec.attack if spec else "none", "eps": spec.eps if spec else 0.0,
            "steps": spec.steps if spec else 0, "objective": spec.objective if spec else "none",
            "classifier": classifier, "criterion": criterion}


def chance_accuracy(labels: np.ndarray) -> float:
    """Accuracy (%) of always predicting the most frequent class of `labels`."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return 100.0 * float(counts.max() / counts.sum())


# ----------------------------------------------------------------------------- one function per check


def check_monotone(model: str, check: str, param: str, points: Sequence[tuple[AttackSpec, float]], n: int,
                   z: float, classifier: str, start: float | None = None) -> list[dict]:
    """Accuracy must not rise along `param` (steps or eps): each point <= the lowest before + noise.

    `start` is the accuracy before the first point (clean: no attack), so the first point is a
    check too (an attack must not raise accuracy); without it the first point is only the
    reference of the next and passes by construction. Both accuracies are estimates on n patches,
    so the noise is z standard errors of their difference, sqrt(SE(acc)^2 + SE(lowest)^2), not
    the SE of one of them."""
    rows, best = [], start
    for i, (spec, acc) in enumerate(sorted(points, key=lambda t: getattr(t[0], param))):
        tol = z * math.hypot(binomial_se(acc, n), binomial_se(best, n)) if best is not None else 0.0
        ok = best is None or acc <= best + tol
        before = f"clean acc ({start:.2f})" if i == 0 and start is not None else f"min acc at smaller {param}"
        rows.append(_row(model, check, param, getattr(spec, param), acc, ok, spec, classifier,
                         f"acc <= {before} + {z:g} SE of the difference ({tol:.2f})"))
        best = acc if best is None else min(best, acc)
    return rows


def check_restarts(model: str, runs: Sequence[tuple[AttackSpec, np.ndarray]], gap: float, classifier: str) -> list[dict]:
    """Per-restart accuracies against the worst case over all restarts (`correct` masks per run).

    Passed when no single run, and not their mean, lies more than `gap` points above the worst
    case: restarts that keep finding new adversarial examples mean one run is a weak attack.
    """
    accs = [100.0 * float(c.mean()) for _, c in runs]
    worst = 100.0 * float(np.logical_and.reduce([c for _, c in runs]).mean())
    rows = [_row(model, "restarts", "restart", r, acc, acc - worst <= gap, spec, classifier,
                 f"restart acc - worst over {len(runs)} restarts ({worst:.2f}) <= {gap:g}")
            for r, ((spec, _), acc) in enumerate(zip(runs, accs), start=1)]
    mean = float(np.mean(accs))
    rows.append(_row(model, "restarts", "worst_of", len(runs), worst, mean - worst <= gap, runs[0][0], classifier,
                     f"mean single-run acc ({mean:.2f}) - worst over restarts <= {gap:g}"))
    return rows


def check_converged(model: str, short: tuple[AttackSpec, float], long: tuple[AttackSpec, float], gap: float,
                    classifier: str) -> dict:
    """The sweep's step count must be enough: acc at the sweep's steps - acc at more steps <= gap."""
    (spec_s, acc_s), (spec_l, acc_l) = short, long
    return _row(model, "converged", "steps", spec_l.steps, acc_l, acc_s - acc_l <= gap, spec_l, classifier,
                f"acc at {spec_s.steps} steps ({acc_s:.2f}) - acc at {spec_l.steps} steps <= {gap:g}")


def check_large_eps(model: str, check: str, spec: AttackSpec, acc: float, chance: float, margin: float,
                    classifier: str) -> dict:
    """At a very large eps an honest attack reaches chance: acc <= chance + margin."""
    return _row(model, check, "eps", spec.eps, acc, acc <= chance + margin, spec, classifier,
                f"acc <= chance ({chance:.2f}) + {margin:g}")


def check_noise(model: str, spec: AttackSpec, noise_acc: float, attack_acc: float, clean_acc: float, n: int,
                z: float, classifier: str) -> dict:
    """Uniform noise in the ball must hurt at most half as much as the attack (plus noise)."""
    attack_drop = clean_acc - attack_acc
    tol = z * binomial_se(clean_acc, n)
    ok = clean_acc - noise_acc <= 0.5 * max(attack_drop, 0.0) + tol
    return _row(model, "noise", "eps", spec.eps, noise_acc, ok, spec, classifier,
                f"noise drop <= 0.5 x PGD drop ({attack_drop:.2f}) + {z:g} SE ({tol:.2f})")


def check_precision(model: str, spec: AttackSpec, low_acc: float, fp32_acc: float, precision: str, n: int,
                    z: float, classifier: str) -> dict:
    """The attack crafted at `precision` must be no weaker than in fp32: low_acc <= fp32_acc + z SE."""
    tol = z * binomial_se(fp32_acc, n)
    return _row(model, "precision", "precision", precision, low_acc, low_acc <= fp32_acc + tol, spec, classifier,
                f"acc crafted in {precision} <= acc crafted in fp32 ({fp32_acc:.2f}) + {z:g} SE ({tol:.2f})")


def check_above_clean(whitebox: pd.DataFrame, n_patches: int, z: float, level: str = "patch") -> pd.DataFrame:
    """Every model's accuracy at `level` under every attack row <= its clean accuracy + z SE
    (n_patches: how many examples each accuracy counts at that level).

    Above-clean accuracy under attack means the attack failed to find the worst case. Rows that
    can never exceed clean are left out, as a check of them could not fail (`cannot_exceed_clean`).
    """
    rows = []
    wb = whitebox[(whitebox["level"] == level) & ~cannot_exceed_clean(whitebox)]
    for (model, clf), g in wb.groupby(["model", "classifier"], sort=True):
        clean = g.loc[g["attack"] == "none", "acc"]
        if clean.empty:
            continue
        clean_acc = float(clean.iloc[0])
        tol = z * binomial_se(clean_acc, n_patches)
        for r in g[g["attack"] != "none"].itertuples():
            spec = AttackSpec(r.attack, float(r.eps), int(r.steps), r.objective)
            rows.append(_row(model, "above_clean", "attack", f"{r.attack}/{r.objective}/{clf}@{r.eps:g}", r.acc,
                             r.acc <= clean_acc + tol, spec, clf,
                             f"acc <= clean ({clean_acc:.2f}) + {z:g} SE ({tol:.2f}), n={n_patches}"))
    return pd.DataFrame(rows, columns=list(SANITY_COLUMNS))


def cannot_exceed_clean(whitebox: pd.DataFrame) -> pd.Series:
    """Rows whose accuracy is at most clean by construction: the worst case (an example counts
    only when its clean prediction is correct too) and AutoAttack scored by the classifier whose
    decisions it took -- the probe's AutoAttack by the probe, the kNN's (`KNNVote`, any soft-kNN
    temperature) by the kNN: it keeps an adversarial image only where that classifier's fp32
    scores call it wrong, and returns the clean image elsewhere."""
    aa = whitebox["attack"] == "autoattack"
    on_probe = (whitebox["objective"] == AUTOATTACK_OBJECTIVE) & (whitebox["classifier"] == "linear")
    on_knn = whitebox["objective"].map(lambda o: parse_knn_objective(str(o)) is not None) & (whitebox["classifier"] == "knn")
    return (whitebox["attack"] == WORST_CASE) | (aa & (on_probe | on_knn))


def check_mil_converged(whitebox: pd.DataFrame, gap: float) -> pd.DataFrame:
    """The ABMIL bag attack's `converged` check, from whitebox.csv: for each model and eps where
    the bag PGD under `abmil_ce` ran at two step counts (`evaluation.mil.converged`), slide-level
    accuracy at the sweep's steps - accuracy at the most steps <= `gap` points."""
    rows = []
    wb = whitebox[(whitebox["classifier"] == MIL_CLASSIFIER) & (whitebox["level"] == "slide")
                  & (whitebox["attack"] == "pgd") & (whitebox["objective"] == MIL_LABEL_OBJECTIVE)]
    for (model, eps), g in wb.groupby(["model", "eps"], sort=True):
        if g["steps"].nunique() < 2:
            continue
        g = g.sort_values("steps")
        short, long = g.iloc[0], g.iloc[-1]
        spec_s = AttackSpec("pgd", float(eps), int(short["steps"]), MIL_LABEL_OBJECTIVE)
        spec_l = AttackSpec("pgd", float(eps), int(long["steps"]), MIL_LABEL_OBJECTIVE)
        rows.append(check_converged(model, (spec_s, float(short["acc"])), (spec_l, float(long["acc"])), gap,
                                    MIL_CLASSIFIER))
    return pd.DataFrame(rows, columns=list(SANITY_COLUMNS))


def check_whitebox_vs_transfer(whitebox: pd.DataFrame, transfer: pd.DataFrame, n_patches: int, z: float) -> pd.DataFrame:
    """White-box attacks must not be weaker than transferred ones (Carlini et al. 2019).

    Each transfer row (patch level, surrogate != target) is compared with the target's worst
    case at the same eps and classifier (or, without worst-case rows, its white-box row of the
    same attack, steps and objective): passed when white-box acc <= transferred acc + z SE.
    """
    wb = whitebox[whitebox["level"] == "patch"].rename(columns={"model": "target", "acc": "wb_acc"})
    tr = transfer[(transfer["level"] == "patch") & (transfer["surrogate"] != transfer["target"])]
    worst = wb[wb["attack"] == "worst_case"]
    if not worst.empty:
        merged = tr.merge(worst[["target", "eps", "classifier", "wb_acc"]], on=["target", "eps", "classifier"], how="inner")
    else:
        cols = ["attack", "eps", "steps", "objective", "classifier"]
        merged = tr.merge(wb[["target", *cols, "wb_acc"]], on=["target", *cols], how="inner")
    rows = []
    for r in merged.itertuples():
        tol = z * binomial_se(float(r.acc), n_patches)
        spec = AttackSpec(r.attack, float(r.eps), int(r.steps), r.objective)
        rows.append(_row(r.target, "whitebox_vs_transfer", "surrogate", r.surrogate, r.wb_acc, r.wb_acc <= r.acc + tol,
                         spec, r.classifier, f"white-box acc <= transferred acc ({r.acc:.2f}) + {z:g} SE ({tol:.2f})"))
    return pd.DataFrame(rows, columns=list(SANITY_COLUMNS))


# ----------------------------------------------------------------------------- runners


CONVERGED_OBJECTIVES: dict[str, str] = {"linear_ce": "linear", "knn_soft": "knn"}
"""The label-based attacks whose convergence is checked, and the classifier each one is scored by."""
PRECISION_OBJECTIVES: dict[str, str] = {"feature": "knn", "linear_ce": "linear", "knn_soft": "knn"}
"""Objectives of the `precision` check and the classifier that scores each."""


def sanity_specs(cfg_eval: Mapping[str, Any], seed: int = 0) -> dict[str, list[AttackSpec]]:
    """The attack specs of every per-model check (a spec shared by two checks runs once)."""
    wb, san = cfg_eval["whitebox"], cfg_eval["sanity"]
    steps = int(wb["steps"])
    eps_ref = float(max(wb["eps"]))
    big = float(san["large_eps"])
    alpha = sweep_alpha(wb, eps_ref)  # one step for every steps count at eps_ref: more steps only search longer
    noise_eps = sorted({float(e) for e in wb["eps"]} | {big})
    return {
        "steps": [AttackSpec("pgd", eps_ref, int(st), "linear_ce", alpha, seed) for st in san["steps"]],
        "steps_feature_knn": [AttackSpec("pgd", eps_ref, int(st), "feature", alpha, seed) for st in san["steps"]],
        "converged": [AttackSpec("pgd", eps_ref, st, obj, alpha, seed)
                      for obj in CONVERGED_OBJECTIVES for st in (steps, 2 * steps)],
        "restarts": restart_specs(cfg_eval, seed),  # every model's sweep runs these too: they are in its worst case
        "eps": [AttackSpec("pgd", float(e), steps, "linear_ce", sweep_alpha(wb, e), seed) for e in sorted(san["eps"])],
        "large_eps_label": [AttackSpec("pgd", big, steps, "linear_ce", sweep_alpha(wb, big), seed)],
        "large_eps_feature": [AttackSpec("pgd", big, steps, "feature", sweep_alpha(wb, big), seed)],
        "noise_pgd": [AttackSpec("pgd", e, steps, "linear_ce", sweep_alpha(wb, e), seed) for e in noise_eps],
        "noise": [AttackSpec("noise", e, 0, "none", float(wb["alpha"]), seed) for e in noise_eps],
        "precision": [AttackSpec("pgd", eps_ref, steps, obj, alpha, seed) for obj in PRECISION_OBJECTIVES],
    }


def sanity_checks(
    model: nn.Module,
    probe: LinearProbe,
    bank: tuple,
    val_dataset: Dataset,
    cfg_eval: Mapping[str, Any],
    *,
    model_name: str = "",
    device: Any = "cpu",
    indices: Sequence[int] | None = None,
    attack_seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """The per-model checks of this module on the attacked validation subset, rows `SANITY_COLUMNS`."""
    cfg_eval = resolve_evaluation(cfg_eval)
    san = cfg_eval["sanity"]
    if indices is None:
        indices = attack_subset(val_dataset, cfg_eval, seed=attack_seed)
    by_check = sanity_specs(cfg_eval, seed=attack_seed)
    unique = list(dict.fromkeys(s for specs in by_check.values() for s in specs))
    precision = effective_precision(cfg_eval["attack_precision"], device)
    run = lambda specs, prec, desc: run_attacks(  # noqa: E731
        model, probe, bank, val_dataset, specs, ["knn", "linear"], probe.num_classes, knn=cfg_eval["knn"],
        indices=indices, batch_size=cfg_eval["batch_size"], device=device, progress=progress, desc=desc, precision=prec)
    res = run(unique, precision, f"sanity {model_name}".strip())
    y, n, z = res.labels, len(res.labels), float(san["z"])
    scores = dict(zip(unique, res.adv))
    acc = lambda spec, clf: patch_accuracy(scores[spec][clf], y)  # noqa: E731
    chance = chance_accuracy(y)
    clean_acc = patch_accuracy(res.clean["linear"], y)
    clean_knn = patch_accuracy(res.clean["knn"], y)
    m = model_name
    rows: list[dict] = []
    rows += check_monotone(m, "steps", "steps", [(s, acc(s, "linear")) for s in by_check["steps"]], n, z, "linear",
                           start=clean_acc)
    rows += check_monotone(m, "steps_feature_knn", "steps",
                           [(s, acc(s, "knn")) for s in by_check["steps_feature_knn"]], n, z, "knn", start=clean_knn)
    conv = by_check["converged"]
    for short, long in zip(conv[::2], conv[1::2]):
        clf = CONVERGED_OBJECTIVES[short.objective]
        rows.append(check_converged(m, (short, acc(short, clf)), (long, acc(long, clf)), float(san["converge_gap"]), clf))
    rows += check_restarts(m, [(s, scores[s]["linear"].argmax(1) == y) for s in by_check["restarts"]],
                           float(san["restart_gap"]), "linear")
    rows += check_monotone(m, "eps", "eps", [(s, acc(s, "linear")) for s in by_check["eps"]], n, z, "linear",
                           start=clean_acc)
    for check, clf in (("large_eps_label", "linear"), ("large_eps_feature", "knn")):
        spec = by_check[check][0]
        rows.append(check_large_eps(m, check, spec, acc(spec, clf), chance, float(san["chance_margin"]), clf))
    for spec_pgd, spec_noise in zip(by_check["noise_pgd"], by_check["noise"]):
        rows.append(check_noise(m, spec_noise, acc(spec_noise, "linear"), acc(spec_pgd, "linear"), clean_acc, n, z, "linear"))
    if precision != "fp32":
        ref = run(by_check["precision"], "fp32", f"sanity fp32 {model_name}".strip())
        for spec, scores_fp32 in zip(ref.specs, ref.adv):
            clf = PRECISION_OBJECTIVES[spec.objective]
            rows.append(check_precision(m, spec, acc(spec, clf), patch_accuracy(scores_fp32[clf], y), precision, n, z, clf))
    df = pd.DataFrame(rows, columns=list(SANITY_COLUMNS))
    failed = df[~df["passed"]]
    if len(failed):
        log.warning("%s: %d attack sanity check(s) failed: %s", model_name or "model", len(failed),
                    ", ".join(f"{c}={v}" for c, v in zip(failed["check"], failed["value"])))
    return df


def study_checks(whitebox: pd.DataFrame, transfer: pd.DataFrame, n_patches: int, cfg_eval: Mapping[str, Any],
                 n_slides: int | None = None) -> pd.DataFrame:
    """The checks that need every model's results: `above_clean`, `whitebox_vs_transfer` and the
    ABMIL bag attack's `converged`; with `n_slides` (validation slides), `above_clean` also for
    the slide-level ABMIL rows."""
    z = float(resolve_evaluation(cfg_eval)["sanity"]["z"])
    parts = []
    if not whitebox.empty:
        parts.append(check_above_clean(whitebox, n_patches, z))
        if n_slides:
            parts.append(check_above_clean(whitebox[whitebox["classifier"] == MIL_CLASSIFIER], n_slides, z, level="slide"))
        parts.append(check_mil_converged(whitebox, float(resolve_evaluation(cfg_eval)["sanity"]["converge_gap"])))
        if not transfer.empty:
            parts.append(check_whitebox_vs_transfer(whitebox, transfer, n_patches, z))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(SANITY_COLUMNS))
