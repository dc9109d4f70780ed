"""Tables 1-4 of the paper as views of the tidy result CSVs (CSV, Markdown and LaTeX).

Nothing is recomputed here: rows of `results/whitebox.csv` / `results/transfer.csv` are
filtered, averaged over the models that share (group, method, backbone) -- seeds -- and laid
out as in the paper. A cell shows `mean ± std` when more than one model contributes; the `n`
column says how many did.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from hsat import LEVELS
from hsat.errors import HSATError
from hsat.io import write_csv, write_text
from hsat.report import method_label

log = logging.getLogger(__name__)

ABLATION_METHODS = ("hsat_lmax_patch", "hsat_lmax_patch_slide", "hsat")
LEVEL_METHODS = ("hsat_patch", "hsat_slide", "hsat")
WHITEBOX_REQUIRED = ("model", "method", "attack", "eps", "classifier", "level", "acc", "mca")
TRANSFER_REQUIRED = ("surrogate", "target", "level", "acc_drop", "mca_drop")


# ----------------------------------------------------------------------------- helpers


def _check_columns(df: pd.DataFrame, required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise HSATError(f"{what}: missing column(s) {', '.join(missing)} (have: {', '.join(map(str, df.columns))})")


def model_info(study_cfg: Mapping[str, Any]) -> pd.DataFrame:
    """One row per model of the study: backbone, pretrained flag, group and resolved method levels."""
    from hsat.config import run_config_for_model

    rows = []
    for name, spec in (study_cfg.get("models") or {}).items():
        run = run_config_for_model(study_cfg, name)
        rows.append(
            {
                "model": name,
                "backbone": run["model"]["backbone"],
                "pretrained": bool(run["model"]["pretrained"] or run["model"]["pretrained_path"]),
                "cfg_group": spec.get("group"),
                "cfg_method": run["method"]["name"],
                "min_levels": "+".join(run["method"]["min_levels"]),
                "max_levels": "+".join(run["method"]["max_levels"]),
            }
        )
    return pd.DataFrame(rows, columns=["model", "backbone", "pretrained", "cfg_group", "cfg_method", "min_levels", "max_levels"])


def primary_setting(whitebox: pd.DataFrame, study_cfg: Mapping[str, Any]) -> tuple[str, str]:
    """The (classifier, objective) the tables show: the first configured one present in the data."""
    wb = (study_cfg.get("evaluation") or {}).get("whitebox") or {}
    classifiers = [c for c in wb.get("classifiers", []) if c in set(whitebox["classifier"])]
    classifier = classifiers[0] if classifiers else str(whitebox["classifier"].iloc[0])
    attacked = whitebox[whitebox["attack"] != "none"]
    present = set(attacked["objective"]) if "objective" in attacked else set()
    objectives = [o for o in wb.get("objectives", []) if o in present]
    objective = objectives[0] if objectives else (str(sorted(present)[0]) if present else "none")
    return classifier, objective


def _prepare_whitebox(whitebox: pd.DataFrame, study_cfg: Mapping[str, Any]) -> tuple[pd.DataFrame, str, str]:
    """Rows of the primary classifier/objective, one per (model, condition, level), with backbone and group."""
    _check_columns(whitebox, WHITEBOX_REQUIRED, "whitebox results")
    df = whitebox.copy()
    classifier, objective = primary_setting(df, study_cfg)
    if "objective" not in df:
        df["objective"] = "none"
    clean = df["attack"] == "none"
    df = df[(df["classifier"] == classifier) & (clean | (df["objective"] == objective))].copy()
    df.loc[df["attack"] == "none", "eps"] = 0
    # Clean rows may repeat once per objective; they are the same numbers, keep one.
    df = df.drop_duplicates(subset=["model", "attack", "eps", "level"], keep="first")
    info = model_info(study_cfg)
    df = df.merge(info, on="model", how="left")
    df["backbone"] = df["backbone"].fillna("?")
    if "group" not in df:
        df["group"] = df["cfg_group"]
    df["group"] = df["group"].fillna(df["cfg_group"]).fillna("default").astype(str)
    df["method"] = df["method"].astype(str)
    return df, classifier, objective


def condition_order(study_cfg: Mapping[str, Any], df: pd.DataFrame) -> list[tuple[str, float]]:
    """(attack, eps) pairs in table order: clean first, then the configured attacks by eps."""
    wb = (study_cfg.get("evaluation") or {}).get("whitebox") or {}
    attacks = [a for a in wb.get("attacks", []) if a in set(df["attack"])]
    attacks += sorted(set(df["attack"]) - set(attacks) - {"none"})
    out: list[tuple[str, float]] = [("none", 0.0)] if (df["attack"] == "none").any() else []
    for attack in attacks:
        for eps in sorted(df.loc[df["attack"] == attack, "eps"].unique()):
            out.append((attack, float(eps)))
    return out


def condition_label(attack: str, eps: float) -> str:
    if attack == "none":
        return "Clean"
    eps_txt = f"{eps:g}"
    return f"{'MI-FGSM' if attack == 'mifgsm' else attack.upper()} {eps_txt}/255"


def fmt(mean: float, std: float, n: int) -> str:
    """`mean ± std` over n > 1 models, else the single value (one decimal, percentages)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if n > 1 and std is not None and not math.isnan(std):
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.1f}"


def summarize(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Mean, sample std and number of models of acc and mca over the models sharing `keys`."""
    agg = df.groupby(list(keys), sort=False, dropna=False).agg(
        acc_mean=("acc", "mean"),
        acc_std=("acc", "std"),
        mca_mean=("mca", "mean"),
        mca_std=("mca", "std"),
        n=("model", "nunique"),
    )
    return agg.reset_index()


def _wide_table(
    df: pd.DataFrame,
    conditions: Sequence[tuple[str, float]],
    row_keys: Sequence[str],
    row_label: Callable[[Mapping[str, Any]], dict[str, Any]],
) -> pd.DataFrame:
    """Rows = `row_keys` groups; columns = (condition, metric, level) cells formatted mean ± std."""
    summ = summarize(df, [*row_keys, "attack", "eps", "level"])
    levels = [lvl for lvl in LEVELS[::-1] if lvl in set(df["level"])]  # patch, slide, patient
    rows = []
    for key, block in summ.groupby(list(row_keys), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[Any, Any] = dict(row_label(dict(zip(row_keys, key))))
        row["n"] = int(block["n"].max())
        for attack, eps in conditions:
            for metric in ("acc", "mca"):
                for level in levels:
                    hit = block[(block["attack"] == attack) & (block["eps"] == eps) & (block["level"] == level)]
                    col = (condition_label(attack, eps), "Acc" if metric == "acc" else "MCA", level)
                    if hit.empty:
                        row[col] = "–"
                    else:
                        h = hit.iloc[0]
                        row[col] = fmt(float(h[f"{metric}_mean"]), float(h[f"{metric}_std"]), int(h["n"]))
        rows.append(row)
    return pd.DataFrame(rows)


def _split_index(table: pd.DataFrame, index_cols: Sequence[str]) -> pd.DataFrame:
    """Turn label columns into the index and the tuple columns into a 3-level column index."""
    table = table.set_index(list(index_cols))
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["Condition", "Metric", "Level"])
    return table


def save_table(table: pd.DataFrame, out_dir: str | Path, name: str, caption: str) -> list[Path]:
    """Write `name`.csv (flat header), `name`.md and `name`.tex; return the three paths."""
    out_dir = Path(out_dir)
    flat = table.copy()
    if isinstance(flat.columns, pd.MultiIndex):
        flat.columns = [" ".join(str(p) for p in col if str(p)) for col in flat.columns]
    flat = flat.reset_index()
    paths = [out_dir / f"{name}.csv", out_dir / f"{name}.md", out_dir / f"{name}.tex"]
    write_csv(paths[0], flat)
    write_text(paths[1], f"{caption}\n\n{flat.to_markdown(index=False)}\n")
    latex = table.to_latex(
        caption=caption, label=f"tab:{name}", multicolumn=True, multicolumn_format="c", escape=True
    )
    write_text(paths[2], latex)
    return paths


# ----------------------------------------------------------------------------- the tables


def table1(whitebox: pd.DataFrame, study_cfg: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """White-box robustness: clean and every attack x eps, Acc and MCA per level, grouped by init."""
    df, classifier, objective = _prepare_whitebox(whitebox, study_cfg)
    conditions = condition_order(study_cfg, df)
    table = _wide_table(
        df,
        conditions,
        ["group", "method", "backbone"],
        lambda k: {"Group": k["group"], "Method": method_label(k["method"]), "Backbone": k["backbone"]},
    )
    caption = (
        f"Table 1: white-box robustness ({classifier} classifier, {objective} attack objective); "
        "accuracy (Acc) and mean class accuracy (MCA) in % per level; mean ± std over n models (seeds)."
    )
    return _split_index(table, ["Group", "Method", "Backbone", "n"]), caption


def _models_for(study_cfg: Mapping[str, Any], df: pd.DataFrame, key: str, methods: Sequence[str]) -> list[str]:
    chosen = list(((study_cfg.get("tables") or {}).get(key)) or [])
    if chosen:
        return chosen
    return sorted(df.loc[df["method"].isin(methods), "model"].unique())


def _max_eps_pgd(df: pd.DataFrame) -> float | None:
    pgd = df.loc[df["attack"] == "pgd", "eps"]
    return float(pgd.max()) if not pgd.empty else None


def table3(whitebox: pd.DataFrame, study_cfg: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """HSAT-Patch / HSAT-Slide / HSAT-Patient: clean and PGD at the largest eps."""
    df, classifier, objective = _prepare_whitebox(whitebox, study_cfg)
    df = df[df["model"].isin(_models_for(study_cfg, df, "table3_models", LEVEL_METHODS))]
    eps = _max_eps_pgd(df)
    conditions = [("none", 0.0)] + ([("pgd", eps)] if eps is not None else [])
    names = {"hsat_patch": "HSAT-Patch", "hsat_slide": "HSAT-Slide", "hsat": "HSAT-Patient"}
    table = _wide_table(
        df,
        conditions,
        ["group", "method", "backbone"],
        lambda k: {"Group": k["group"], "Method": names.get(k["method"], method_label(k["method"])), "Backbone": k["backbone"]},
    )
    caption = (
        f"Table 3: level of hierarchical adversarial training, clean and PGD at eps {eps or 0:g}/255 "
        f"({classifier} classifier, {objective} objective); mean ± std over n models."
    )
    if table.empty:
        return pd.DataFrame(), caption
    return _split_index(table, ["Group", "Method", "Backbone", "n"]), caption


def table4(whitebox: pd.DataFrame, study_cfg: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """L_max ablation: the attack maximises fewer levels while the encoder minimises all three."""
    df, classifier, objective = _prepare_whitebox(whitebox, study_cfg)
    df = df[df["model"].isin(_models_for(study_cfg, df, "table4_models", ABLATION_METHODS))].copy()
    eps = _max_eps_pgd(df)
    conditions = [("none", 0.0)] + ([("pgd", eps)] if eps is not None else [])
    df["max_levels"] = df["max_levels"].fillna("?")
    df["min_levels"] = df["min_levels"].fillna("?")
    table = _wide_table(
        df,
        conditions,
        ["group", "backbone", "max_levels", "min_levels"],
        lambda k: {
            "Group": k["group"],
            "Backbone": k["backbone"],
            "L_max levels": k["max_levels"].replace("+", " + "),
            "L_min levels": k["min_levels"].replace("+", " + "),
        },
    )
    caption = (
        f"Table 4: L_max ablation, clean and PGD at eps {eps or 0:g}/255 ({classifier} classifier, "
        f"{objective} objective); mean ± std over n models."
    )
    if table.empty:
        return pd.DataFrame(), caption
    table["_order"] = table["L_max levels"].str.count(r"\+")
    table = table.sort_values(["Group", "Backbone", "_order"]).drop(columns="_order")
    return _split_index(table, ["Group", "Backbone", "L_max levels", "L_min levels", "n"]), caption


def table2(transfer: pd.DataFrame, study_cfg: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """Transfer matrix: accuracy drop (Acc-D, MCA-D) on each target per surrogate and level, with averages."""
    tcfg = (study_cfg.get("evaluation") or {}).get("transfer") or {}
    caption = (
        f"Table 2: transferability of {str(tcfg.get('attack', 'pgd')).upper()} eps {tcfg.get('eps', 8):g}/255 "
        "examples crafted on a surrogate (rows) and classified by a target (columns): drop in accuracy "
        "(Acc-D) and mean class accuracy (MCA-D), percentage points; Average is over surrogates."
    )
    if transfer.empty:
        return pd.DataFrame(), caption
    _check_columns(transfer, TRANSFER_REQUIRED, "transfer results")
    df = transfer.copy()
    for col in ("attack", "eps", "classifier", "objective"):
        if col in df and col in tcfg and (df[col] == tcfg[col]).any():
            df = df[df[col] == tcfg[col]]
    df = df.groupby(["level", "surrogate", "target"], sort=False)[["acc_drop", "mca_drop"]].mean().reset_index()
    levels = [lvl for lvl in LEVELS[::-1] if lvl in set(df["level"])]
    targets = list(dict.fromkeys(df["target"]))
    surrogates = list(dict.fromkeys(df["surrogate"]))
    blocks = []
    for level in levels:
        sub = df[df["level"] == level]
        wide = sub.pivot(index="surrogate", columns="target", values=["acc_drop", "mca_drop"])
        wide = wide.reindex(index=[s for s in surrogates if s in set(sub["surrogate"])])
        wide = wide.reindex(columns=pd.MultiIndex.from_product([["acc_drop", "mca_drop"], targets]))
        wide.loc["Average"] = wide.mean(axis=0, skipna=True)
        wide = wide.swaplevel(0, 1, axis=1).reindex(columns=pd.MultiIndex.from_product([targets, ["acc_drop", "mca_drop"]]))
        wide.columns = pd.MultiIndex.from_tuples(
            [(t, "Acc-D" if m == "acc_drop" else "MCA-D") for t, m in wide.columns], names=["Target", "Metric"]
        )
        wide.index = pd.MultiIndex.from_product([[level], wide.index], names=["Level", "Surrogate"])
        blocks.append(wide)
    table = pd.concat(blocks).map(lambda v: "–" if pd.isna(v) else f"{v:.1f}")
    return table, caption


def write_tables(
    whitebox: pd.DataFrame, transfer: pd.DataFrame, study_cfg: Mapping[str, Any], out_dir: str | Path
) -> list[Path]:
    """Write results/tables/table{1..4}.{csv,md,tex}; return every path written."""
    if whitebox.empty:
        raise HSATError("whitebox results are empty: nothing to tabulate")
    written: list[Path] = []
    for name, (table, caption) in (
        ("table1", table1(whitebox, study_cfg)),
        ("table2", table2(transfer, study_cfg)),
        ("table3", table3(whitebox, study_cfg)),
        ("table4", table4(whitebox, study_cfg)),
    ):
        if table.empty:
            log.warning("%s: no matching results; writing an empty table", name)
            table = pd.DataFrame({"note": ["no matching results in this study"]})
        written += save_table(table, out_dir, name, caption)
    return written


# ----------------------------------------------------------------------------- headline claims


def _stats(values: pd.Series) -> dict[str, Any]:
    values = values.dropna()
    if values.empty:
        return {"mean": None, "std": None, "n": 0}
    std = float(values.std(ddof=1)) if len(values) > 1 else None
    return {"mean": float(values.mean()), "std": std, "n": int(len(values))}


def headline(
    whitebox: pd.DataFrame,
    study_cfg: Mapping[str, Any],
    sanity: pd.DataFrame | None = None,
    level: str = "patch",
    margin: float = 15.0,
) -> dict[str, Any]:
    """The paper's claims as measured, per group (initialisation) and backbone: results/metrics.json.

    - robust gain: HSAT's `level` accuracy under PGD at eps 8 (the largest PGD eps if 8 is absent)
      minus the baseline's, mean over models (seeds); holds when >= `margin` points.
    - clean gain: HSAT's clean `level` accuracy minus HSAT-Patch's; holds when > 0.
    Each number is a mean over the models of a method; `std` and `n` give the spread over seeds.
    """
    df, classifier, objective = _prepare_whitebox(whitebox, study_cfg)
    baseline = ((study_cfg.get("tables") or {}).get("baseline")) or "hidisc"
    pgd_eps = sorted(df.loc[df["attack"] == "pgd", "eps"].unique())
    eps = 8.0 if 8.0 in pgd_eps else (float(pgd_eps[-1]) if pgd_eps else None)
    out: dict[str, Any] = {"classifier": classifier, "objective": objective, "level": level, "pgd_eps": eps}
    groups: dict[str, Any] = {}
    for (group, backbone), g in df[df["level"] == level].groupby(["group", "backbone"], sort=True):
        per_model = lambda method, attack, e: g[(g["method"] == method) & (g["attack"] == attack) & (g["eps"] == e)].groupby("model")["acc"].mean()  # noqa: E731
        hsat_pgd = _stats(per_model("hsat", "pgd", eps))
        base_pgd = _stats(per_model(baseline, "pgd", eps))
        hsat_clean = _stats(per_model("hsat", "none", 0))
        patch_clean = _stats(per_model("hsat_patch", "none", 0))
        robust = (
            hsat_pgd["mean"] - base_pgd["mean"] if hsat_pgd["n"] and base_pgd["n"] else None
        )
        clean = hsat_clean["mean"] - patch_clean["mean"] if hsat_clean["n"] and patch_clean["n"] else None
        groups[f"{group}:{backbone}"] = {
            "hsat_pgd_acc": hsat_pgd,
            f"{baseline}_pgd_acc": base_pgd,
            "hsat_minus_baseline_pgd_acc": robust,
            "claim_robust_gain_holds": None if robust is None else bool(robust >= margin),
            "robust_gain_margin": margin,
            "hsat_clean_acc": hsat_clean,
            "hsat_patch_clean_acc": patch_clean,
            "hsat_minus_hsat_patch_clean_acc": clean,
            "claim_clean_gain_holds": None if clean is None else bool(clean > 0),
        }
    out["groups"] = groups
    if sanity is not None and not sanity.empty and "passed" in sanity:
        passed = sanity["passed"].astype(str).str.lower().isin(["true", "1", "1.0"])
        out["sanity_checks"] = int(len(sanity))
        out["sanity_failed"] = int((~passed).sum())
    return out
