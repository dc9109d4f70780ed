"""A robustness card per encoder: the numbers a lab would attach to a model it shares, on one page.

Per level (patch, slide, patient) and the tables' primary classifier: clean accuracy, the
per-example worst case over every L-inf attack at eps 4/255 and 8/255 (whitebox.csv), the mean
accuracy drop on the model of examples transferred from the other surrogates (transfer.csv, when
the model is a target there), and natural-shift accuracy per family and severity with the
worst case over every family (shift.csv). Nothing is recomputed: every number is a row of those
files (or a mean of the transfer rows), so a card can be checked against them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from hsat import LEVELS
from hsat.errors import HSATError
from hsat.io import write_json
from hsat.report import method_label
from hsat.report.tables import (
    SHIFT_CLEAN, SHIFT_WORST_CASE, WORST_CASE, _select_transfer, _transfer_cfg, model_info, primary_setting,
    shift_families_present, shift_label,
)

CARD_EPS: tuple[float, ...] = (4.0, 8.0)
"""The L-inf budgets (1/255) a card reports the worst case at."""
CARD_LEVELS: tuple[str, ...] = tuple(LEVELS[::-1])


def _value(rows: pd.DataFrame) -> float | None:
    """The accuracy of one condition: its row's (a clean row repeated per objective holds the same
    number; the first is taken); None when there is none."""
    rows = rows.dropna(subset=["acc"])
    return None if rows.empty else float(rows["acc"].iloc[0])


def _model_rows(df: pd.DataFrame | None, model: str, column: str = "model") -> pd.DataFrame:
    if df is None or df.empty or column not in df:
        return pd.DataFrame(columns=["level", "acc"])
    return df[df[column].astype(str) == model]


def robustness_card(
    model: str,
    study_cfg: Mapping[str, Any],
    whitebox: pd.DataFrame,
    shift: pd.DataFrame | None = None,
    transfer: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """The card of `model` as a JSON-plain dict: who it is (method, group, backbone, seed), the
    classifier, and per level its clean accuracy, L-inf worst case at CARD_EPS, transfer drop and
    natural-shift accuracy; a number the results lack is None."""
    wb = _model_rows(whitebox, model)
    if wb.empty:
        raise HSATError(f"robustness card: model {model!r} has no rows in whitebox.csv")
    classifier, _ = primary_setting(whitebox, study_cfg)
    wb = wb[wb["classifier"] == classifier]
    info = model_info(study_cfg).set_index("model")
    entry = info.loc[model] if model in info.index else None
    method = str(wb["method"].iloc[0]) if "method" in wb else (entry["cfg_method"] if entry is not None else "")
    sh = _model_rows(shift, model)
    sh = sh[sh["classifier"] == classifier] if not sh.empty else sh
    families = shift_families_present(sh) if not sh.empty else []
    tr = _model_rows(transfer, model, "target")
    if not tr.empty:
        tr = _select_transfer(tr, _transfer_cfg(study_cfg))
        tr = tr[tr["surrogate"].astype(str) != model]
    levels: dict[str, Any] = {}
    for level in CARD_LEVELS:
        w, s = wb[wb["level"] == level], sh[sh["level"] == level] if not sh.empty else sh
        t = tr[tr["level"] == level] if not tr.empty else tr
        entry_level: dict[str, Any] = {
            "clean_acc": _value(w[w["attack"] == "none"]),
            "linf_worst_case_acc": {f"{e:g}": _value(w[(w["attack"] == WORST_CASE) & (w["eps"] == e)]) for e in CARD_EPS},
            "transfer_acc_drop": float(t.groupby("surrogate")["acc_drop"].mean().mean()) if not t.empty else None,
            "transfer_surrogates": sorted(map(str, set(t["surrogate"]))) if not t.empty else [],
        }
        if not s.empty:
            sev = s["severity"].astype(int)
            entry_level["shift_acc"] = {
                f: {str(int(v)): _value(s[(s["attack"] == f) & (sev == v)]) for v in sorted(set(sev[s["attack"] == f]))}
                for f in families
            }
            worst = s[s["attack"] == SHIFT_WORST_CASE]
            entry_level["shift_worst_case_acc"] = {str(int(v)): _value(worst[worst["severity"].astype(int) == v])
                                                   for v in sorted(set(worst["severity"].astype(int)))}
        else:
            entry_level["shift_acc"], entry_level["shift_worst_case_acc"] = {}, {}
        levels[level] = entry_level
    return {
        "model": model,
        "method": method,
        "method_label": method_label(method),
        "group": None if entry is None or pd.isna(entry["cfg_group"]) else str(entry["cfg_group"]),
        "backbone": None if entry is None else str(entry["backbone"]),
        "seed": None if entry is None else int(entry["cfg_seed"]),
        "classifier": classifier,
        "eps_unit": "1/255",
        "shift_families": {f: shift_label(f) for f in families},
        "levels": levels,
    }


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1f}"


def card_figure(card: Mapping[str, Any]):
    """One page: accuracy per level clean, under the L-inf worst case and the shift worst case
    (bars), accuracy against severity per shift family (patch level), and the numbers as text."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from hsat.report.figures import PAGE_WIDTH

    sns.set_theme(style="whitegrid", context="paper")
    fig = plt.figure(figsize=(PAGE_WIDTH, 7.5))
    grid = fig.add_gridspec(3, 2, height_ratios=[1.0, 1.0, 0.9])
    levels = [lvl for lvl in CARD_LEVELS if lvl in card["levels"]]
    bars = []
    for level in levels:
        entry = card["levels"][level]
        worst_shift = entry["shift_worst_case_acc"]
        top = worst_shift[max(worst_shift, key=int)] if worst_shift else None
        bars.append({"level": level, "condition": "clean", "acc": entry["clean_acc"]})
        for eps, acc in entry["linf_worst_case_acc"].items():
            bars.append({"level": level, "condition": f"L∞ worst case {eps}/255", "acc": acc})
        bars.append({"level": level, "condition": "shift worst case" + (f" (sev. {max(worst_shift, key=int)})" if worst_shift else ""),
                     "acc": top})
    ax = fig.add_subplot(grid[0, :])
    data = pd.DataFrame(bars).dropna(subset=["acc"])
    if not data.empty:
        sns.barplot(data=data, x="level", y="acc", hue="condition", ax=ax, palette="viridis")
        ax.legend(fontsize=6, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("")
    ax.set_title("Clean, L∞ worst case and natural-shift worst case", fontsize=8)
    for col, level in enumerate(("patch", "patient")):
        ax = fig.add_subplot(grid[1, col])
        entry = card["levels"].get(level, {})
        shift = entry.get("shift_acc") or {}
        for family, by_sev in shift.items():
            xs = [int(s) for s in by_sev]
            ax.plot(xs, [by_sev[s] for s in by_sev], marker="o", ms=3, lw=1.1, label=card["shift_families"].get(family, family))
        worst = entry.get("shift_worst_case_acc") or {}
        if worst:
            xs = [0, *map(int, worst)]
            ax.plot(xs, [entry["clean_acc"], *worst.values()], color="black", ls="--", lw=1.4, label="worst case")
        if not shift:
            ax.text(0.5, 0.5, "no natural-shift results", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylim(0, 100)
        ax.set_xlabel("severity (0 = clean)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Natural shifts, {level} level", fontsize=8)
        if col == 1 and shift:
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax = fig.add_subplot(grid[2, :])
    ax.axis("off")
    rows = [[lvl, _fmt(card["levels"][lvl]["clean_acc"]),
             *[_fmt(v) for v in card["levels"][lvl]["linf_worst_case_acc"].values()],
             _fmt(card["levels"][lvl]["transfer_acc_drop"]),
             _fmt(next(reversed(card["levels"][lvl]["shift_worst_case_acc"].values()), None))] for lvl in levels]
    eps_cols = [f"L∞ WC {e}/255" for e in card["levels"][levels[0]]["linf_worst_case_acc"]] if levels else []
    table = ax.table(cellText=rows, colLabels=["level", "clean", *eps_cols, "transfer drop", "shift WC"], loc="center",
                     cellLoc="center")
    table.set_fontsize(7)
    fig.suptitle(f"Robustness card: {card['model']} ({card['method_label']}, {card['backbone']}, group {card['group']}, "
                 f"seed {card['seed']}); {card['classifier']} classifier, accuracy in %", fontsize=9)
    fig.tight_layout()
    return fig


def write_card(card: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """`out_dir/<model>.json`, `.png` and `.pdf`, each written atomically."""
    from hsat.report.figures import save_figure

    out_dir = Path(out_dir)
    path = out_dir / f"{card['model']}.json"
    write_json(path, card)
    return [path, *save_figure(card_figure(card), out_dir, str(card["model"]))]
