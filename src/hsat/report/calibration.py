"""The embedded cohort's calibration, judged from `whitebox.csv` rows only.

A candidate cohort is measured on HiDisc and the two supervised references (never on HSAT) with
the default study's evaluation; the targets are patch-level accuracies, mean over seeds:

- HiDisc, kNN: clean >= 70 % and worst case at 8/255 <= 15 % (the paper's fragile baseline);
- supervised_at, its own head: clean >= 60 % and worst case at 8/255 >= 45 % (robustness is
  learnable on the cohort).

Each target names the classifier its method is scored by: HiDisc is evaluated by kNN (as the
issue says), the robust reference by the head that Madry et al.'s adversarial training makes
robust. kNN and the probe on the reference's features are reported beside it (the summary
table), not judged: they are classifiers its training never saw. A target is `met` or `not met`
on the mean; fewer than `MIN_SEEDS` seeds make the verdict provisional, and a cohort is
adoptable only when every target is met on enough seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd

from hsat.errors import HSATError

MIN_SEEDS = 3
"""Seeds a target needs before its verdict counts (>= 3 seeds of HiDisc and of each reference)."""


@dataclass(frozen=True)
class Target:
    """One calibration target: `method`'s `classifier` accuracy at `measure` compared with `bound`."""

    method: str
    classifier: str
    measure: str  # "clean" or "worst_8"
    op: str  # ">=" or "<="
    bound: float

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


TARGETS: tuple[Target, ...] = (
    Target("hidisc", "knn", "clean", ">=", 70.0),
    Target("hidisc", "knn", "worst_8", "<=", 15.0),
    Target("supervised_at", "head", "clean", ">=", 60.0),
    Target("supervised_at", "head", "worst_8", ">=", 45.0),
)

MEASURES: dict[str, tuple[str, float, str | None]] = {
    "clean": ("none", 0.0, None),
    "pgd_8_feature": ("pgd", 8.0, "feature"),
    "worst_4": ("worst_case", 4.0, None),
    "worst_8": ("worst_case", 8.0, None),
}
"""Table columns: (attack, eps, objective or any) of the patch-level row each is read from."""


def per_model(whitebox: pd.DataFrame) -> pd.DataFrame:
    """One row per model and classifier: its patch-level accuracy at every measure of `MEASURES`."""
    need = {"model", "method", "seed", "attack", "eps", "objective", "classifier", "level", "acc"}
    missing = need - set(whitebox.columns)
    if missing:
        raise HSATError(f"whitebox rows lack column(s) {sorted(missing)}")
    wb = whitebox[whitebox["level"] == "patch"]
    rows = []
    for (model, method, seed, clf), g in wb.groupby(["model", "method", "seed", "classifier"], sort=True):
        row = {"model": model, "method": method, "seed": int(seed), "classifier": clf}
        for name, (attack, eps, objective) in MEASURES.items():
            sel = g[(g["attack"] == attack) & (g["eps"].astype(float) == eps)]
            if objective is not None:
                sel = sel[sel["objective"] == objective]
            row[name] = float(sel["acc"].iloc[0]) if len(sel) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "method", "seed", "classifier", *MEASURES])


def summary(whitebox: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample sd and seed count per method and classifier, for every measure."""
    pm = per_model(whitebox)
    out = []
    for (method, clf), g in pm.groupby(["method", "classifier"], sort=True):
        row: dict[str, object] = {"method": method, "classifier": clf, "seeds": len(g)}
        for name in MEASURES:
            row[f"{name}_mean"] = float(g[name].mean())
            row[f"{name}_sd"] = float(g[name].std(ddof=1)) if len(g) > 1 else float("nan")
        out.append(row)
    return pd.DataFrame(out)


def verdicts(whitebox: pd.DataFrame, targets: Sequence[Target] = TARGETS) -> pd.DataFrame:
    """Each target with its mean, sd, seeds, the worst seed and a verdict (`met` / `not met` / `no rows`)."""
    pm = per_model(whitebox)
    rows = []
    for t in targets:
        g = pm[(pm["method"] == t.method) & (pm["classifier"] == t.classifier)][t.measure].dropna()
        if g.empty:
            rows.append({"target": _label(t), "mean": float("nan"), "sd": float("nan"), "seeds": 0,
                         "worst_seed": float("nan"), "verdict": "no rows"})
            continue
        mean = float(g.mean())
        verdict = "met" if t.met(mean) else "not met"
        if len(g) < MIN_SEEDS:
            verdict += f" (provisional: {len(g)} seed{'s' if len(g) > 1 else ''})"
        worst = float(g.min() if t.op == ">=" else g.max())
        rows.append({"target": _label(t), "mean": mean, "sd": float(g.std(ddof=1)) if len(g) > 1 else float("nan"),
                     "seeds": len(g), "worst_seed": worst, "verdict": verdict})
    return pd.DataFrame(rows, columns=["target", "mean", "sd", "seeds", "worst_seed", "verdict"])


def adoptable(table: pd.DataFrame) -> bool:
    """True when every target is met on at least `MIN_SEEDS` seeds."""
    return bool(len(table)) and bool((table["verdict"] == "met").all())


def _label(t: Target) -> str:
    measure = "clean" if t.measure == "clean" else "worst case 8/255"
    return f"{t.method} {t.classifier} {measure} {t.op} {t.bound:g}"


def _fmt(mean: float, sd: float) -> str:
    if mean != mean:
        return "-"
    return f"{mean:.1f}" if sd != sd else f"{mean:.1f} ± {sd:.1f}"


def format_markdown(whitebox: pd.DataFrame, title: str = "Calibration") -> str:
    """The summary and the target verdicts as Markdown (what docs/synthetic_cohort.md quotes)."""
    s = summary(whitebox)
    lines = [f"## {title}", "", "Patch level, mean ± sd over seeds (%).", "",
             "| method | classifier | seeds | clean | PGD-8 feature | worst case 4/255 | worst case 8/255 |",
             "|---|---|---|---|---|---|---|"]
    for _, r in s.iterrows():
        cells = [_fmt(r[f"{m}_mean"], r[f"{m}_sd"]) for m in MEASURES]
        lines.append(f"| {r['method']} | {r['classifier']} | {r['seeds']} | " + " | ".join(cells) + " |")
    v = verdicts(whitebox)
    lines += ["", "| target | mean ± sd | seeds | worst seed | verdict |", "|---|---|---|---|---|"]
    for _, r in v.iterrows():
        lines.append(f"| {r['target']} | {_fmt(r['mean'], r['sd'])} | {r['seeds']} | "
                     f"{'-' if r['worst_seed'] != r['worst_seed'] else f'{r.worst_seed:.1f}'} | {r['verdict']} |")
    lines += ["", f"Adoptable (every target met on >= {MIN_SEEDS} seeds): **{'yes' if adoptable(v) else 'no'}**.", ""]
    return "\n".join(lines)

