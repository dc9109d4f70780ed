"""Compact views of a study for DVC: plot data for `dvc plots show` and a few headline numbers
for `dvc metrics show`.

DVC draws a data series from a flat file with declared x and y fields, and shows every key of a
metrics file as a column. The tidy result CSVs hold thousands of rows and `metrics.json` some
seventy keys, so the report stage writes these small views of them; nothing is recomputed
(the same rows as Table 1, the same claims as `claims.md`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from hsat import LEVELS
from hsat.io import write_csv, write_json
from hsat.report import method_label
from hsat.report.claims import VERDICTS
from hsat.report.figures import read_run_logs
from hsat.report.tables import WORST_CASE, _prepare_whitebox

ROBUST_ACCURACY_COLUMNS = ["level", "label", "method", "group", "backbone", "eps", "acc", "std", "n"]
TRAINING_COLUMNS = ["label", "method", "model", "step", "loss"]


def row_labels(df: pd.DataFrame) -> pd.Series:
    """A display name per Table 1 row (group, method, backbone): the method's label, with the
    backbone and group named only where the method has rows on several of them."""
    rows = df[["group", "method", "backbone"]].drop_duplicates()
    backbones = rows.groupby("method")["backbone"].nunique()
    groups = rows.groupby("method")["group"].nunique()

    def label(r: pd.Series) -> str:
        extra = ([r["backbone"]] if backbones[r["method"]] > 1 else []) + ([r["group"]] if groups[r["method"]] > 1 else [])
        return method_label(r["method"]) + (f" ({', '.join(extra)})" if extra else "")

    return df.apply(label, axis=1) if not df.empty else pd.Series([], dtype=str)


def robust_accuracy_points(whitebox: pd.DataFrame, study_cfg: Mapping[str, Any]) -> pd.DataFrame:
    """Accuracy of the tables' classifier in the worst case at each eps (clean at eps 0) per level
    and Table 1 row: mean over the row's models (seeds), their std (empty for one model) and n.
    One line per row in `dvc plots show`, one panel per level."""
    df, _, _ = _prepare_whitebox(whitebox, study_cfg)
    df = df[df["attack"].isin(["none", WORST_CASE])].copy()
    if df.empty:
        return pd.DataFrame(columns=ROBUST_ACCURACY_COLUMNS)
    df["label"] = row_labels(df)
    keys = ["level", "label", "method", "group", "backbone", "eps"]
    per_model = df.groupby([*keys, "model"], sort=False)["acc"].mean()
    out = per_model.groupby(level=keys, sort=False).agg(["mean", "std", "count"]).reset_index()
    out = out.rename(columns={"mean": "acc", "count": "n"})
    out["level"] = pd.Categorical(out["level"], [lvl for lvl in LEVELS[::-1] if lvl in set(out["level"])])
    out = out.sort_values(["level", "label", "eps"], kind="stable")
    out["level"] = out["level"].astype(str)
    return out[ROBUST_ACCURACY_COLUMNS].reset_index(drop=True)


def training_points(runs_dir: str | Path, study_cfg: Mapping[str, Any]) -> pd.DataFrame:
    """Each model's total training loss against the optimiser step, with its method's label:
    one panel per method, one line per model (seed)."""
    models = study_cfg.get("models") or {}
    logs = read_run_logs(runs_dir, list(models) or None)
    if logs.empty or "loss_total" not in logs:
        return pd.DataFrame(columns=TRAINING_COLUMNS)
    methods = {name: ((spec or {}).get("method") or {}).get("name", name) for name, spec in models.items()}
    logs = logs.dropna(subset=["loss_total"])
    method = logs["model"].map(methods).fillna(logs["model"])
    out = pd.DataFrame({
        "label": method.map(method_label),
        "method": method,
        "model": logs["model"],
        "step": logs["step"].astype(int),
        "loss": logs["loss_total"].astype(float),
    })
    return out.sort_values(["label", "model", "step"], kind="stable").reset_index(drop=True)


def headline_numbers(
    points: pd.DataFrame,
    study_cfg: Mapping[str, Any],
    claims: Sequence[Mapping[str, Any]] = (),
    sanity_failed: int | None = None,
) -> dict[str, Any]:
    """The few numbers worth comparing across runs (`dvc metrics show`, `dvc metrics diff`): HSAT's
    and the baseline's clean and worst-case patch accuracy (eps 8, else the largest) per group
    and backbone, how many claims hold, fail or cannot be judged, how many sanity checks failed.

    `points` is `robust_accuracy_points`: the same numbers as Table 1.
    """
    baseline = ((study_cfg.get("tables") or {}).get("baseline")) or "hidisc"
    patch = points[points["level"] == "patch"]
    attacked = sorted(float(e) for e in patch["eps"].unique() if e > 0)
    eps = 8.0 if 8.0 in attacked else (attacked[-1] if attacked else None)
    out: dict[str, Any] = {"worst_case_eps": eps}
    for (group, backbone), g in patch[patch["method"].isin(["hsat", baseline])].groupby(["group", "backbone"], sort=True):
        entry = {}
        for method, rows in g.groupby("method", sort=False):
            acc = rows.set_index("eps")["acc"]
            entry[method] = {
                "clean": round(float(acc[0.0]), 2) if 0.0 in acc else None,
                "worst_case": round(float(acc[eps]), 2) if eps in acc else None,
            }
        if len(entry) == 2:
            out[f"{group}/{backbone}"] = {m: entry[m] for m in ("hsat", baseline)}
    out["claims"] = {v.replace(" ", "_"): sum(c.get("verdict") == v for c in claims) for v in VERDICTS}
    if sanity_failed is not None:
        out["sanity_failed"] = int(sanity_failed)
    return out


def write_dvc_views(
    whitebox: pd.DataFrame,
    study_cfg: Mapping[str, Any],
    runs_dir: str | Path,
    metrics: Mapping[str, Any],
    plots_dir: str | Path,
    summary: str | Path,
) -> list[Path]:
    """Write plots_dir/robust_accuracy.csv, plots_dir/training_loss.csv and the summary JSON;
    `metrics` is the study's metrics.json (its claims and sanity counts)."""
    plots_dir = Path(plots_dir)
    points = robust_accuracy_points(whitebox, study_cfg)
    paths = [plots_dir / "robust_accuracy.csv", plots_dir / "training_loss.csv", Path(summary)]
    write_csv(paths[0], points)
    write_csv(paths[1], training_points(runs_dir, study_cfg))
    write_json(paths[2], headline_numbers(points, study_cfg, metrics.get("claims") or (), metrics.get("sanity_failed")))
    return paths
