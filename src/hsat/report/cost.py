"""Where a study's time goes: its jobs' own Snakemake benchmarks, by rule and by method.

Every rule of the workflow writes Snakemake's per-job benchmark
(`results/benchmarks/<rule>/<job>.tsv`: wall seconds, peak memory, ...). `job_costs` reads them
into one tidy frame, attributing each job to the model it belongs to (its wildcard, or
`craft_<model>` for a transfer surrogate) and to that model's method; `cost_tables` sums them by
rule and by method, with the lower bound on the wall time that the job-seconds put on `cores`
cores. Jobs of models that are not in the study (left over from another config) are dropped, and
counted, so the tables describe the study as configured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from hsat.config import run_config_for_model
from hsat.errors import HSATError
from hsat.io import write_csv, write_text
from hsat.methods import method_label

COLUMNS = ["rule", "job", "model", "method", "backbone", "seconds", "max_rss_mb"]
"""Columns of `cost.csv`: one row per job; `model` and `backbone` empty for study-wide jobs."""

STUDY_WIDE = "(study-wide)"
"""`method` of the jobs that belong to no single model (data, text embeddings, reports)."""

STUDY_WIDE_RULES = ("synth", "prepare", "text", "report")
"""Rules whose jobs belong to no single model; every other rule's job is one model's, and is left
out (counted as dropped) when that model is not in the study."""


def _read_benchmark(path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one job's benchmark file. A `repeat(file, n)` benchmark holds
    one row per run of the job, so the job's time is their sum."""
    try:
        df = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise HSATError(f"{path}: not a Snakemake benchmark file ({exc})") from None
    if df.empty or "s" not in df.columns:
        raise HSATError(f"{path}: not a Snakemake benchmark file (no row with an 's' column)")
    seconds = pd.to_numeric(df["s"], errors="coerce")
    if seconds.isna().any() or (seconds < 0).any():
        raise HSATError(f"{path}: 's' holds {df['s'].tolist()!r}, not numbers of seconds")
    rss = pd.to_numeric(df["max_rss"], errors="coerce").max() if "max_rss" in df.columns else float("nan")
    return float(seconds.sum()), float(rss)


def job_costs(benchmarks: str | Path, study: Mapping[str, Any]) -> tuple[pd.DataFrame, int]:
    """One row per job of the study (COLUMNS), and how many benchmark files were dropped because
    their model is not in `study["models"]`."""
    root = Path(benchmarks)
    if not root.is_dir():
        raise HSATError(f"{root}: no such directory (the workflow writes its jobs' benchmarks under results/benchmarks)")
    files = sorted(root.rglob("*.tsv"))
    if not files:
        raise HSATError(f"{root}: no benchmark files (*.tsv) found")
    models = {}
    for name in study.get("models") or {}:
        cfg = run_config_for_model(study, name)
        models[str(name)] = (str(cfg["method"]["name"]), str(cfg["model"]["backbone"]))
    rows, dropped = [], 0
    for path in files:
        rel = path.relative_to(root)
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        job = rel.with_suffix("").as_posix().split("/", 1)[-1]
        name = Path(job).name
        model = name[len("craft_"):] if rule == "transfer" and name.startswith("craft_") else name
        if rule == "transfer":
            rule = "transfer craft" if name.startswith("craft_") else "transfer score"
        if model not in models:
            if rule not in STUDY_WIDE_RULES:  # another config's model
                dropped += 1
                continue
            model = ""
        seconds, rss = _read_benchmark(path)
        method, backbone = (method_label(models[model][0]), models[model][1]) if model else (STUDY_WIDE, "")
        rows.append({"rule": rule, "job": job, "model": model, "method": method, "backbone": backbone,
                     "seconds": seconds, "max_rss_mb": rss})
    return pd.DataFrame(rows, columns=COLUMNS), dropped


def cost_tables(jobs: pd.DataFrame, cores: int = 2) -> dict[str, pd.DataFrame]:
    """`by_rule` (jobs, job-seconds, mean, longest, peak RSS), `by_method` (per method and backbone: models, pretraining,
    evaluation and other per-model job-seconds, per model) and `total` (job-seconds, and the wall
    time they take at least on `cores` cores: the larger of job-seconds / cores and the longest job)."""
    if cores < 1:
        raise HSATError(f"cores must be >= 1, got {cores}")
    by_rule = (
        jobs.groupby("rule", sort=False)
        .agg(jobs=("seconds", "size"), job_seconds=("seconds", "sum"), mean_s=("seconds", "mean"),
             longest_s=("seconds", "max"), peak_rss_mb=("max_rss_mb", "max"))
        .sort_values("job_seconds", ascending=False)
        .reset_index()
    )
    per_model = jobs[jobs["model"] != ""]
    kind = per_model["rule"].map(lambda r: r if r in ("pretrain", "evaluate") else "other")
    split = per_model.assign(kind=kind).pivot_table(index=["method", "backbone"], columns="kind", values="seconds",
                                                    aggfunc="sum", fill_value=0.0)
    split = split.reindex(columns=["pretrain", "evaluate", "other"], fill_value=0.0)
    by_method = split.rename(columns={"pretrain": "pretrain_s", "evaluate": "evaluate_s", "other": "other_s"})
    by_method.insert(0, "models", per_model.groupby(["method", "backbone"])["model"].nunique())
    by_method["total_s"] = by_method[["pretrain_s", "evaluate_s", "other_s"]].sum(axis=1)
    by_method["per_model_s"] = by_method["total_s"] / by_method["models"]
    study_wide = float(jobs.loc[jobs["model"] == "", "seconds"].sum())
    by_method = by_method.sort_values("total_s", ascending=False).reset_index()
    if study_wide:
        by_method.loc[len(by_method)] = {"method": STUDY_WIDE, "backbone": "", "models": 0, "pretrain_s": 0.0, "evaluate_s": 0.0,
                                         "other_s": study_wide, "total_s": study_wide, "per_model_s": float("nan")}
    job_seconds = float(jobs["seconds"].sum())
    longest = float(jobs["seconds"].max()) if len(jobs) else 0.0
    total = pd.DataFrame([{
        "jobs": len(jobs), "models": int(per_model["model"].nunique()), "job_seconds": job_seconds,
        "cores": int(cores), "wall_lower_bound_min": max(job_seconds / cores, longest) / 60.0,
    }])
    return {"by_rule": by_rule, "by_method": by_method, "total": total}


def write_cost(jobs: pd.DataFrame, tables: Mapping[str, pd.DataFrame], out_dir: str | Path, dropped: int = 0) -> list[Path]:
    """`cost.csv` (the jobs) and `cost.md` (the three tables) in `out_dir`, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "cost.csv", jobs)
    t = tables["total"].iloc[0]
    text = [
        "# Where the study's time goes\n",
        f"{int(t['jobs'])} jobs of {int(t['models'])} models, {t['job_seconds']:,.0f} job-seconds "
        f"(Snakemake's per-job benchmarks): at least {t['wall_lower_bound_min']:.1f} minutes of wall time "
        f"on {int(t['cores'])} cores, before Snakemake's own overhead."
        + (f" {dropped} benchmark files of models outside this study were left out." if dropped else "") + "\n",
        "## By method (job-seconds)\n",
        tables["by_method"].round(1).to_markdown(index=False) + "\n",
        "## By rule (seconds; peak RSS in MB)\n",
        tables["by_rule"].round(1).to_markdown(index=False) + "\n",
    ]
    write_text(out / "cost.md", "\n".join(text))
    return [out / "cost.csv", out / "cost.md"]
