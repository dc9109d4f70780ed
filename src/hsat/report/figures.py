"""Figures of the study (seaborn; PNG and PDF), drawn from the tidy CSVs and the run logs.

Every figure is always written -- with a "no data" note when its inputs are empty -- so the
workflow's outputs are the same for every study config. Figures are sized for a paper's page
(`PAGE_WIDTH` inches wide, or a column of it) so their text stays legible when printed; a method
has one colour and a model one name in all of them (`hsat.report.style`).
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from hsat import LEVELS  # noqa: E402
from hsat.io import atomic_path  # noqa: E402
from hsat.report import method_label  # noqa: E402
from hsat.report.style import method_colours, method_order, model_names, model_styles  # noqa: E402
from hsat.report.tables import (  # noqa: E402
    ATTACK_LABELS, SHIFT_CLEAN, SHIFT_WORST_CASE, _prepare_whitebox, _select_transfer, _transfer_cfg, model_names_for,
    prepare_shift, shift_families_present, shift_label, transfer_order,
)

log = logging.getLogger(__name__)

FIGURES = ("robust_accuracy", "transfer_heatmap", "training_curves", "embedding_map", "attack_steps", "natural_shift")
"""Figure names; each is written as results/figures/<name>.png and .pdf."""

PAGE_WIDTH = 7.0
"""Inches: a two-column paper's text width; a figure drawn at it prints at 100 %."""


# A PDF's creation date would make every run's figures differ from the last: the files are a
# function of the results alone (matplotlib writes no date into a PNG).
_METADATA = {"pdf": {"CreationDate": None}, "png": None}


def save_figure(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    """`out_dir/name.png` and `.pdf`, each written atomically, the same bytes for the same figure."""
    out_dir = Path(out_dir)
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{name}.{ext}"
        with atomic_path(path, suffix=f".{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=200, bbox_inches="tight", metadata=_METADATA[ext])
        paths.append(path)
    plt.close(fig)
    return paths


def _no_data(title: str, why: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    return fig


def _names(names: pd.DataFrame | None, data: pd.DataFrame | None = None) -> pd.DataFrame:
    """`names` when given, else display names from `data`'s own columns (model, method, group,
    seed): a figure drawn without its study config still colours and orders by method."""
    if names is not None:
        return names
    cols = ["model", "method", "group", "seed"]
    if data is None or data.empty or "model" not in data:
        return model_names(pd.DataFrame(columns=[*cols, "backbone"]))
    info = data.drop_duplicates("model")[[c for c in cols if c in data]].copy()
    for col, default in (("method", ""), ("group", ""), ("seed", 0)):
        if col not in info:
            info[col] = info["model"] if col == "method" else default
    return model_names(info.assign(backbone=""))


def _styles(names: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """`model_styles` of `models`, indexed by model, in display order; a model `names` lacks is
    drawn under its own name in a colour of its own."""
    known = model_styles(names).set_index("model")
    others = [m for m in dict.fromkeys(map(str, models)) if m not in known.index]
    if others:
        extra = model_styles(model_names(pd.DataFrame(
            {"model": others, "method": others, "group": "", "backbone": "", "seed": 0}))).set_index("model")
        extra["label"] = extra.index
        known = pd.concat([known, extra])
    return known.loc[[m for m in known.index if m in set(map(str, models))]]


def _model_legend(styles: pd.DataFrame) -> list[Line2D]:
    """One entry per series (method colour, variant marker), then one per seed (line style) when
    the models drawn have several seeds."""
    handles = [Line2D([], [], color=row["colour"], marker=row["marker"], ms=4, lw=1.4, label=series)
               for series, row in styles.drop_duplicates("series").set_index("series").iterrows()]
    seeds = styles.drop_duplicates("seed").sort_values("seed")
    if len(seeds) > 1:
        handles += [Line2D([], [], color="0.3", ls=row["linestyle"], lw=1.2, label=f"seed {row['seed']}")
                    for _, row in seeds.iterrows()]
    return handles


def _wrap_name(name: str, width: int = 10) -> str:
    """Break a long name at spaces or underscores so tick labels stay narrow and never overlap."""
    sep = " " if " " in str(name) else "_"
    lines, line = [], ""
    for part in str(name).split(sep):
        piece = part if not line else f"{sep}{part}"
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = part
        else:
            line += piece
    return "\n".join([*lines, line])


# ----------------------------------------------------------------------------- figures


def robust_accuracy(whitebox: pd.DataFrame, study_cfg: Mapping[str, Any], names: pd.DataFrame | None = None) -> plt.Figure:
    """Accuracy against eps (clean at eps 0) per method, one panel per attack x level; sd over seeds.

    A method's colour is its own (`method_colours`); a second series of a method (another group or
    backbone) is dashed.
    """
    if whitebox.empty:
        return _no_data("Robust accuracy", "no white-box results")
    df, classifier, objective = _prepare_whitebox(whitebox, study_cfg)
    names = model_names_for(study_cfg, df) if names is None else names
    clean = df[df["attack"] == "none"]
    attacks = [a for a in dict.fromkeys(df["attack"]) if a != "none"]
    # The clean point starts every attack's curve.
    parts = [df[df["attack"] != "none"]] + [clean.assign(attack=a) for a in attacks]
    plot = pd.concat(parts, ignore_index=True)
    plot["Method"] = plot["method"].map(method_label)
    series = dict(zip(names["model"], names["series"]))
    plot["series"] = plot["model"].map(series).fillna(plot["Method"])
    plot["Variant"] = [s[len(m):].strip(" ()") if s.startswith(m) and s != m else ("main" if s == m else s)
                       for s, m in zip(plot["series"], plot["Method"])]
    plot["Attack"] = plot["attack"].map(lambda a: ATTACK_LABELS.get(a, a.upper()))
    levels = [lvl for lvl in LEVELS[::-1] if lvl in set(plot["level"])]
    plot["Level"] = plot["level"].map(lambda lvl: f"{lvl} level")
    hue_order = method_order(plot["Method"])
    variants = list(dict.fromkeys(["main", *plot["Variant"]])) if plot["Variant"].nunique() > 1 else None
    ncols = len(levels)
    width = min(PAGE_WIDTH, 2.3 * ncols)
    g = sns.relplot(
        data=plot, x="eps", y="acc", hue="Method", hue_order=hue_order, palette=method_colours(hue_order),
        style="Variant" if variants else None, style_order=[v for v in (variants or []) if v in set(plot["Variant"])] or None,
        col="Level", row="Attack", col_order=[f"{lvl} level" for lvl in levels],
        row_order=[ATTACK_LABELS.get(a, a.upper()) for a in attacks],
        kind="line", marker="o", markersize=3.5, linewidth=1.2, errorbar="sd", err_kws={"alpha": 0.12},
        height=width / ncols / 1.25, aspect=1.25,
        facet_kws={"margin_titles": True},
    )
    g.set_titles(row_template="{row_name}", col_template="{col_name}")
    g.set_axis_labels("eps (1/255)", "accuracy (%)")
    eps = sorted(plot["eps"].unique())
    for ax in g.axes.flat:
        ax.set_xticks(eps)
        ax.set_xticklabels([f"{e:g}" for e in eps])
    g.figure.suptitle(f"Robust accuracy: {classifier} classifier, attacks on the {objective} objective "
                      "(mean ± sd over seeds)", y=1.01, fontsize=9)
    return g.figure


def natural_shift(shift: pd.DataFrame | None, study_cfg: Mapping[str, Any], names: pd.DataFrame | None = None,
                  level: str = "patch") -> plt.Figure:
    """Accuracy against shift severity (clean at 0) per family, one panel each, then the
    per-example worst case over every family; one line per method, mean ± sd over seeds, at
    `level`, the primary classifier. Methods are coloured as in every figure."""
    if shift is None or shift.empty:
        return _no_data("Natural shifts", "no natural-shift results (evaluation.shift.enabled is false?)")
    df, classifier = prepare_shift(shift, study_cfg)
    df = df[df["level"] == level]
    if df.empty:
        return _no_data("Natural shifts", f"no {level}-level natural-shift results")
    names = model_names_for(study_cfg, df) if names is None else names
    families = shift_families_present(df) + ([SHIFT_WORST_CASE] if (df["attack"] == SHIFT_WORST_CASE).any() else [])
    clean = df[df["attack"] == SHIFT_CLEAN]
    # The clean point starts every curve that lacks its own severity 0 (the worst case always does).
    parts = [df[df["attack"] != SHIFT_CLEAN]]
    parts += [clean.assign(attack=f) for f in families if not ((df["attack"] == f) & (df["severity"] == 0)).any()]
    plot = pd.concat(parts, ignore_index=True)
    plot["Method"] = plot["method"].map(method_label)
    series = dict(zip(names["model"], names["series"]))
    plot["series"] = plot["model"].map(series).fillna(plot["Method"])
    plot["Variant"] = [s[len(m):].strip(" ()") if s.startswith(m) and s != m else ("main" if s == m else s)
                       for s, m in zip(plot["series"], plot["Method"])]
    plot["Family"] = plot["attack"].map(shift_label)
    hue_order = method_order(plot["Method"])
    variants = list(dict.fromkeys(["main", *plot["Variant"]])) if plot["Variant"].nunique() > 1 else None
    ncols = min(4, len(families))
    g = sns.relplot(
        data=plot, x="severity", y="acc", hue="Method", hue_order=hue_order, palette=method_colours(hue_order),
        style="Variant" if variants else None, style_order=[v for v in (variants or []) if v in set(plot["Variant"])] or None,
        col="Family", col_order=[shift_label(f) for f in families], col_wrap=ncols if len(families) > ncols else None,
        kind="line", marker="o", markersize=3.5, linewidth=1.2, errorbar="sd", err_kws={"alpha": 0.12},
        height=PAGE_WIDTH / ncols / 1.2, aspect=1.2,
    )
    g.set_titles(col_template="{col_name}")
    g.set_axis_labels("severity", "accuracy (%)")
    severities = sorted(plot["severity"].unique())
    for ax in g.axes.flat:
        ax.set_xticks(severities)
        ax.set_xticklabels([f"{s:g}" for s in severities])
    g.figure.suptitle(f"Natural shifts: {classifier} classifier, {level} level, severity 0 = clean "
                      "(mean ± sd over seeds; worst case: every family up to that severity)", y=1.01, fontsize=9)
    return g.figure


def transfer_heatmap(transfer: pd.DataFrame, study_cfg: Mapping[str, Any] | None = None,
                     names: pd.DataFrame | None = None) -> plt.Figure:
    """Accuracy drop on each target (columns) of examples crafted on each surrogate (rows), per level.

    Models are named and ordered as in Table 2 (method, then seed); white lines part the methods.
    The colour scale is diverging and centred at 0 so a negative drop (the attack helped) never
    shares the colour of no effect; cells carry their numbers while they are large enough to read.
    """
    if transfer.empty:
        return _no_data("Transfer", "no transfer results (evaluation.transfer.enabled is false?)")
    if study_cfg is not None:  # the configured setting only, as Table 2 shows it
        transfer = _select_transfer(transfer, _transfer_cfg(study_cfg))
    df = transfer.groupby(["level", "surrogate", "target"], sort=False)["acc_drop"].mean().reset_index()
    levels = [lvl for lvl in LEVELS[::-1] if lvl in set(df["level"])]
    if names is None and study_cfg is not None:
        names = model_names_for(study_cfg)
    models = transfer_order(df, study_cfg) if study_cfg is not None else sorted(set(df["surrogate"]) | set(df["target"]))
    styles = _styles(_names(names), models)
    labels = [styles.loc[m, "label"] for m in models]
    series = [styles.loc[m, "series"] for m in models]
    # Cells as large as the page allows (labels and colour bar aside), numbers in them while they fit.
    cell = min(0.42, (PAGE_WIDTH - 1.4 - 0.25 * len(levels)) / (len(levels) * len(models)))
    annotate = cell >= 0.3
    side = cell * len(models)
    font = float(np.clip(cell * 72 * 0.75, 4.5, 7.0))
    fig, axes = plt.subplots(
        1, len(levels) + 1, figsize=(side * len(levels) + 0.25 * len(levels) + 1.4, side + 1.4), squeeze=False,
        gridspec_kw={"width_ratios": [1.0] * len(levels) + [0.05]},
    )
    cbar_ax = axes[0][-1]
    vmax = float(np.nanmax(np.abs(df["acc_drop"]))) if df["acc_drop"].notna().any() else 0.0
    vmax = vmax or 1.0
    bounds = [i for i in range(1, len(models)) if series[i] != series[i - 1]]
    for i, (ax, level) in enumerate(zip(axes[0], levels)):
        mat = df[df["level"] == level].pivot(index="surrogate", columns="target", values="acc_drop")
        mat = mat.reindex(index=models, columns=models)
        sns.heatmap(
            mat, ax=ax, annot=annotate, fmt=".1f", annot_kws={"fontsize": font - 1}, cmap="RdBu_r", center=0,
            vmin=-vmax, vmax=vmax, cbar=i == 0, cbar_ax=cbar_ax if i == 0 else None,
            cbar_kws={"label": "accuracy drop (points)"},
            xticklabels=labels, yticklabels=labels if i == 0 else False, square=True,
            linewidths=0.3 if annotate else 0.0, linecolor="white",
        )
        ax.hlines(bounds, 0, len(models), colors="white", lw=1.5, zorder=3)
        ax.vlines(bounds, 0, len(models), colors="white", lw=1.5, zorder=3)
        ax.grid(False)
        ax.set_facecolor("0.85")  # a pair not run (the diagonal) is grey, never the white of a zero drop
        ax.tick_params(axis="both", labelsize=font, length=0)
        if i == 0:
            ax.set_yticklabels(ax.get_yticklabels(), rotation=0, va="center")
        ax.set_xticklabels(ax.get_xticklabels(), rotation=90 if len(models) > 4 else 0, ha="center")
        ax.set_xlabel("target", fontsize=8)
        ax.set_ylabel("surrogate" if i == 0 else "", fontsize=8)
        ax.set_title(f"{level} level", fontsize=9)
    cbar_ax.tick_params(labelsize=font)
    cbar_ax.yaxis.label.set_size(font + 1)
    fig.tight_layout()
    return fig


def read_run_logs(runs_dir: str | Path, models: Sequence[str] | None = None) -> pd.DataFrame:
    """Concatenate runs/*/log.jsonl (of `models` only, when given: a results folder may hold runs
    of another study config) into one frame with a `model` column, skipping unreadable lines."""
    rows = []
    for path in sorted(Path(runs_dir).glob("*/log.jsonl")):
        if models is not None and path.parent.name not in models:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: skipping a line that is not JSON", path)
                continue
            if isinstance(rec, dict) and "step" in rec:
                rec["model"] = path.parent.name
                rows.append(rec)
    return pd.DataFrame(rows)


def _series_title(name: str) -> tuple[str, str]:
    """(panel title, y label) of a logged series: loss_adv_patch -> adversarial loss, patch level;
    a method's own term keeps its name (loss_clean_align_slide -> clean align loss, slide level)."""
    parts = name.split("_")
    if len(parts) >= 3 and parts[0] == "loss" and parts[1] in ("clean", "adv"):
        kind = "clean" if parts[1] == "clean" else "adversarial"
        level = parts[-1] if parts[-1] in LEVELS else None
        term = " ".join(parts[2:-1] if level else parts[2:])
        return f"{kind} {term + ' ' if term else ''}loss" + (f", {level} level" if level else ""), "loss"
    if name == "eps":
        return "attack eps during training", "eps (1/255)"
    return name.replace("_", " "), name.replace("_", " ")


def smooth(values: pd.Series, window: int) -> pd.Series:
    """Trailing rolling mean over `window` logged steps (the first ones over what there is)."""
    return values.rolling(max(1, int(window)), min_periods=1).mean()


def training_curves(runs_dir: str | Path, models: Sequence[str] | None = None, names: pd.DataFrame | None = None,
                    smoothing: float = 0.1) -> plt.Figure:
    """Clean and adversarial loss per level, and the eps schedule, against the optimiser step.

    Each run is drawn raw (faint) and as a rolling mean over `smoothing` of its logged steps; a
    method has its colour, a seed its line style, a method's second series a marker.
    """
    logs = read_run_logs(runs_dir, models)
    series = [c for c in logs.columns if c.startswith(("loss_clean_", "loss_adv_"))] + (["eps"] if "eps" in logs else [])
    if logs.empty or not series:
        return _no_data("Training curves", "no run logs with losses")
    # The hierarchy's levels first (clean, then adversarial), then the methods' own terms as logged.
    order = [f"loss_{kind}_{lvl}" for kind in ("clean", "adv") for lvl in LEVELS if f"loss_{kind}_{lvl}" in series]
    order += sorted((s for s in series if s not in order and s != "eps"), key=lambda s: not s.startswith("loss_clean_"))
    order += ["eps"] if "eps" in series else []
    order = [s for s in order if logs[s].notna().any()]
    if not order:
        return _no_data("Training curves", "run logs hold no loss values")
    styles = _styles(_names(names, logs[["model"]]), logs["model"].unique())
    ncols = min(4 if len(order) > 6 else 3, len(order))
    nrows = math.ceil(len(order) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PAGE_WIDTH, 1.9 * nrows + 0.4), squeeze=False)
    for ax, name in zip(axes.flat, order):
        for model, row in styles.iterrows():
            run = logs[logs["model"] == model].dropna(subset=[name]).sort_values("step")
            if run.empty:
                continue
            schedule = name == "eps"  # set, not measured: nothing to smooth
            if not schedule:
                ax.plot(run["step"], run[name], color=row["colour"], lw=0.6, alpha=0.25)
            values = run[name] if schedule else smooth(run[name], round(smoothing * len(run)))
            ax.plot(run["step"], values, color=row["colour"], ls=row["linestyle"], lw=1.2,
                    marker=row["marker"], markevery=max(1, len(run) // 6), ms=3)
        title, ylabel = _series_title(name)
        ax.set_title(_short(title, 30), fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(order):]:
        ax.axis("off")
    drawn = styles[styles.index.isin(set(logs["model"]))]
    fig.legend(handles=_model_legend(drawn), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(5, len(drawn) + 3),
               fontsize=7, frameon=False)
    fig.suptitle(f"Training curves (faint: as logged; bold: rolling mean over {smoothing:.0%} of the steps)", fontsize=9)
    fig.tight_layout()
    return fig


def _load_embedding(emb_dir: Path, max_points: int, seed: int) -> pd.DataFrame | None:
    feats_path, index_path = emb_dir / "features.safetensors", emb_dir / "index.csv"
    if not feats_path.is_file() or not index_path.is_file():
        return None
    tensors = load_file(str(feats_path))
    if not tensors:
        return None
    if "train_features" in tensors and "val_features" in tensors:  # hsat embed: train rows, then val rows
        feats = np.concatenate([tensors["train_features"], tensors["val_features"]]).astype(np.float32)
    else:
        feats = np.asarray(tensors["features" if "features" in tensors else sorted(tensors)[0]], dtype=np.float32)
    index = pd.read_csv(index_path)
    if len(index) != len(feats):
        log.warning("%s: %d index rows but %d feature rows; skipping", emb_dir, len(index), len(feats))
        return None
    if "split" in index and (index["split"] == "val").any():
        keep = np.flatnonzero((index["split"] == "val").to_numpy())
    else:
        keep = np.arange(len(index))
    rng = np.random.default_rng(seed)
    if len(keep) > max_points:
        keep = np.sort(rng.choice(keep, size=max_points, replace=False))
    if len(keep) < 5:
        return None

    xy = TSNE(n_components=2, perplexity=min(30.0, (len(keep) - 1) / 3), init="pca", random_state=seed).fit_transform(feats[keep])
    out = index.iloc[keep].reset_index(drop=True).copy()
    out["x"], out["y"] = xy[:, 0], xy[:, 1]
    return out


def embedding_models(names: pd.DataFrame, available: Sequence[str], max_models: int = 4) -> list[str]:
    """The models an embedding map shows: each method's canonical model (its plainest series'
    lowest seed, `model_names`), methods in registry order, those with embeddings, at most
    `max_models`; the first available models when no method has its canonical one."""
    available = set(available)
    picked = [m for m in names.loc[names["canonical"], "model"] if m in available]
    return (picked or sorted(available))[:max_models]


MAX_PATIENT_MARKERS = 8
"""Above this many validation patients in a panel, patients are not told apart (markers would not be)."""


def embedding_map(
    embeddings_dir: str | Path, whitebox: pd.DataFrame | None = None, max_models: int = 4, max_points: int = 400, seed: int = 0,
    models: Sequence[str] | None = None, names: pd.DataFrame | None = None,
) -> plt.Figure:
    """t-SNE of clean validation features (a subsample) of one model per method, coloured by class,
    one marker per patient while there are few (`MAX_PATIENT_MARKERS`).

    The models are `embedding_models`: each method's canonical model, methods in registry order
    (HiDisc, HSAT, HSAT-Patch, ...), at most `max_models`; only `models` when given.
    """
    emb_root = Path(embeddings_dir)
    available = sorted(p.name for p in emb_root.iterdir() if p.is_dir()) if emb_root.is_dir() else []
    if models is not None:
        available = [m for m in available if m in models]
    names = _names(names, whitebox)
    panels = []
    for model in embedding_models(names, available, max_models):
        emb = _load_embedding(emb_root / model, max_points, seed)
        if emb is not None:
            panels.append((model, emb))
    if not panels:
        return _no_data("Embedding map", "no embeddings found")
    labels = dict(zip(names["model"], names["label"]))
    classes = sorted({str(c) for _, emb in panels for c in emb.get("label", pd.Series(dtype=str))})
    class_colours = dict(zip(classes, sns.color_palette("colorblind", n_colors=max(len(classes), 1))))
    patients = sorted({str(p) for _, emb in panels for p in emb.get("patient", pd.Series(dtype=str))})
    markers = dict(zip(patients, ("o", "s", "^", "D", "v", "P", "X", "*"))) if 0 < len(patients) <= MAX_PATIENT_MARKERS else {}
    side = min(PAGE_WIDTH / len(panels), 2.4)
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels), side + 0.3), squeeze=False)
    for ax, (model, emb) in zip(axes[0], panels):
        colour = emb["label"].astype(str).map(class_colours) if "label" in emb else pd.Series(["0.3"] * len(emb))
        marker = emb["patient"].astype(str).map(markers) if markers and "patient" in emb else pd.Series(["o"] * len(emb))
        for m in dict.fromkeys(marker):
            at = (marker == m).to_numpy()
            ax.scatter(emb["x"][at], emb["y"][at], c=list(colour[at]), marker=m, s=9, linewidths=0, alpha=0.85)
        ax.set_title(labels.get(model, model), fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(""), ax.set_ylabel("")
    handles = [Line2D([], [], color=c, marker="o", ls="", ms=5, label=k) for k, c in class_colours.items()]
    fig.legend(handles=handles, loc="upper right" if markers else "upper center",
               bbox_to_anchor=(0.5 if markers else 0.5, 0.0), ncol=min(len(handles), 4), fontsize=7, frameon=False,
               title="class", title_fontsize=7)
    if markers:
        handles = [Line2D([], [], color="0.3", marker=m, ls="", ms=4, label=p) for p, m in markers.items()]
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.52, 0.0), ncol=min(len(handles), 3), fontsize=7,
                   frameon=False, title="patient", title_fontsize=7)
    fig.suptitle("t-SNE of clean validation features, by class" + (" (marker: patient)" if markers else ""), fontsize=9)
    fig.tight_layout()
    return fig


def _passed(values: pd.Series) -> pd.Series:
    return values.astype(str).str.lower().isin(["true", "1", "1.0"])


def _short(text: str, width: int = 48, lines: int = 2) -> str:
    """A criterion short enough for a panel subtitle: at most `lines` lines of `width`."""
    return "\n".join(textwrap.wrap(" ".join(str(text).split()), width=width, max_lines=lines, placeholder=" …"))


def _criterion(sub: pd.DataFrame) -> str:
    if "criterion" not in sub or not sub["criterion"].notna().any():
        return ""
    return _short(sub["criterion"].dropna().astype(str).mode().iloc[0])


def _is_sweep(sub: pd.DataFrame) -> bool:
    """A check sweeps one numeric parameter (steps, eps, restart) over at least two values: draw
    accuracy against it (one value makes a degenerate axis: drawn per model instead)."""
    if not sub["value_num"].notna().all() or sub["value_num"].nunique() < 2:
        return False
    return "param" not in sub or sub["param"].astype(str).nunique() <= 1


def _sweep_panel(ax: plt.Axes, sub: pd.DataFrame, styles: pd.DataFrame) -> pd.Series:
    """Accuracy against the swept value, a line per model; returns each row's x."""
    for model, g in sub.groupby("model", sort=False):
        g = g.sort_values("value_num")
        s = styles.loc[model]
        ax.plot(g["value_num"], g["acc"], marker=s["marker"] or "o", color=s["colour"], ls=s["linestyle"], lw=1.2, ms=3.5)
    values = sorted(sub["value_num"].unique())
    if len(values) <= 6:
        if values[0] > 0 and values[-1] / values[0] >= 8:  # 1, 2, 5, 10 steps or 4 ... 64 eps: spread them out
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(values)
        ax.set_xticklabels([f"{v:g}" for v in values])
    ax.set_xlabel(str(sub["param"].iloc[0]) if "param" in sub and sub["param"].notna().any() else "value")
    return sub["value_num"]


def _restarts_panel(ax: plt.Axes, sub: pd.DataFrame, styles: pd.DataFrame) -> pd.Series:
    """Each restart's accuracy, then the worst over restarts at its own tick (and dashed across)."""
    worst = (sub["param"].astype(str) == "worst_of") if "param" in sub else pd.Series(False, index=sub.index)
    x = _sweep_panel(ax, sub[~worst], styles).reindex(sub.index)
    ax.set_xscale("linear")
    restarts = sorted(sub.loc[~worst, "value_num"].dropna().unique())
    at = (restarts[-1] if restarts else 0) + 1
    x[worst] = at
    for _, row in sub[worst].iterrows():
        colour = styles.loc[row["model"], "colour"]
        ax.axhline(row["acc"], ls="--", lw=0.8, color=colour)
        ax.scatter([at], [row["acc"]], marker="v", s=30, color=colour, zorder=4)
    ax.set_xticks([*restarts, at] if worst.any() else restarts)
    ax.set_xticklabels([f"{r:g}" for r in restarts] + (["worst"] if worst.any() else []))
    ax.set_xlabel("restart")
    return x


def _category_panel(ax: plt.Axes, sub: pd.DataFrame, styles: pd.DataFrame) -> pd.Series:
    """Points per model, one per row of the check (a surrogate, an attack setting); returns each row's x."""
    models = [m for m in styles.index if m in set(sub["model"])]
    x = pd.Series(np.nan, index=sub.index)
    for i, model in enumerate(models):
        g = sub[sub["model"] == model]
        x[g.index] = i + (np.linspace(-0.3, 0.3, len(g)) if len(g) > 1 else 0.0)
        ax.scatter(x[g.index], g["acc"], color=styles.loc[model, "colour"], marker=styles.loc[model, "marker"] or "o",
                   s=14, zorder=3)
    ax.set_xticks(range(len(models)))
    texts = [str(styles.loc[m, "label"]) for m in models]
    if len(models) > MAX_MODELS_IN_A_PANEL:  # a row of its own: names upright
        ax.set_xticklabels(texts, fontsize=6, rotation=90)
    elif max(map(len, texts), default=0) > 10 or len(models) > 3:
        ax.set_xticklabels(texts, fontsize=6, rotation=40, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticklabels([_wrap_name(t) for t in texts], fontsize=6)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_xlabel("")
    return x


MAX_MODELS_IN_A_PANEL = 6
"""A check drawn per model over more models than this takes a row of its own (room for their names)."""


def _panel_places(df: pd.DataFrame, checks: Sequence[str], ncols: int) -> dict[str, tuple[int, int | None]]:
    """(row, column) of each check's panel, in order, `ncols` a row; column None: the whole row."""
    places: dict[str, tuple[int, int | None]] = {}
    row = col = 0
    for check in checks:
        sub = df[df["check"] == check]
        per_model = check != "restarts" and not _is_sweep(sub)
        if per_model and sub["model"].nunique() > MAX_MODELS_IN_A_PANEL:
            row, col = (row + 1, 0) if col else (row, 0)
            places[check] = (row, None)
            row += 1
            continue
        places[check] = (row, col)
        row, col = (row + 1, 0) if col + 1 == ncols else (row, col + 1)
    return places


def attack_steps(sanity: pd.DataFrame, names: pd.DataFrame | None = None) -> plt.Figure:
    """One panel per sanity check, showing its criterion; failed points marked with a red x.

    Sweeps (steps, eps, noise, restarts) are drawn against their parameter; checks whose rows are
    settings rather than a number (whitebox_vs_transfer, above_clean), or a single number, as points
    per model, named on the axis. A panel's title says passed or FAILED (how many rows), so a failed
    check cannot hide in a grid. The legend names the models of the sweeps. Without `names`,
    models are named by their ids.
    """
    if sanity.empty or not {"model", "check", "value", "acc"} <= set(sanity.columns):
        return _no_data("Attack sanity checks", "no sanity results")
    df = sanity.copy()
    df["passed"] = _passed(df["passed"]) if "passed" in df else True
    df["value_num"] = pd.to_numeric(df["value"], errors="coerce")
    df["acc"] = pd.to_numeric(df["acc"], errors="coerce")
    df["model"] = df["model"].astype(str)
    checks = list(dict.fromkeys(df["check"]))
    styles = _styles(_names(names, df), df["model"].unique())
    if names is None:
        styles["label"] = styles.index
    ncols = min(4, len(checks))
    places = _panel_places(df, checks, ncols)
    nrows = max(row for row, _ in places.values()) + 1
    wide = {row for row, col in places.values() if col is None}  # these rows hold the models' names too
    heights = [1.6 if row in wide else 1.0 for row in range(nrows)]
    fig = plt.figure(figsize=(PAGE_WIDTH * ncols / 4, 2.1 * sum(heights) + 0.3))
    grid = fig.add_gridspec(nrows, ncols, height_ratios=heights)
    swept: set[str] = set()
    for check in checks:  # axes in the checks' order
        row, col = places[check]
        ax = fig.add_subplot(grid[row, :] if col is None else grid[row, col])
        sub = df[df["check"] == check]
        if check == "restarts":
            x = _restarts_panel(ax, sub, styles)
            swept |= set(sub["model"])
        elif _is_sweep(sub):
            x = _sweep_panel(ax, sub, styles)
            swept |= set(sub["model"])
        else:
            x = _category_panel(ax, sub, styles)
        failed = ~sub["passed"]
        ax.scatter(x[failed], sub.loc[failed, "acc"], marker="x", s=50, color="red", zorder=5)
        n_failed = int((~sub["passed"]).sum())
        status = f"FAILED ({n_failed})" if n_failed else "passed"
        criterion = _criterion(sub)
        ax.set_title(f"{check}: {status}" + (f"\n{_short(criterion, 34)}" if criterion else ""), fontsize=7,
                     color="red" if n_failed else "black")
        ax.set_ylabel("accuracy (%)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.label.set_size(7)
    handles = _model_legend(styles[styles.index.isin(swept)]) if swept else []
    handles.append(Line2D([], [], color="red", marker="x", ls="", ms=6, label="failed"))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 6), fontsize=7,
               frameon=False)
    fig.tight_layout()
    failed_rows = df[~df["passed"]]
    if not failed_rows.empty:
        log.warning("failed sanity checks:\n%s", failed_rows.drop(columns=["value_num"]).to_string(index=False))
    return fig


def write_figures(
    whitebox: pd.DataFrame,
    transfer: pd.DataFrame,
    sanity: pd.DataFrame,
    study_cfg: Mapping[str, Any],
    runs_dir: str | Path,
    embeddings_dir: str | Path,
    out_dir: str | Path,
    shift: pd.DataFrame | None = None,
) -> list[Path]:
    """Write every figure of FIGURES as PNG and PDF under `out_dir`; return the paths. Run logs and
    embeddings are read for the study's models only (`study_cfg["models"]`, when it names them);
    every figure names, orders and colours models alike (`model_names_for`). `shift`: shift.csv's
    rows (none: the natural-shift figure says so)."""
    study_models = list(study_cfg["models"]) if study_cfg.get("models") else None
    sns.set_theme(style="whitegrid", context="paper")
    names = model_names_for(study_cfg, whitebox if not whitebox.empty else None)
    figs = {
        "robust_accuracy": lambda: robust_accuracy(whitebox, study_cfg, names),
        "transfer_heatmap": lambda: transfer_heatmap(transfer, study_cfg, names),
        "training_curves": lambda: training_curves(runs_dir, study_models, names),
        "embedding_map": lambda: embedding_map(embeddings_dir, whitebox, models=study_models, names=names),
        "attack_steps": lambda: attack_steps(sanity, names),
        "natural_shift": lambda: natural_shift(shift, study_cfg, names),
    }
    written: list[Path] = []
    for name in FIGURES:
        written += save_figure(figs[name](), out_dir, name)
    return written


def attention_figure(entries: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> plt.Figure:
    """Every model's last-block class-token attention, clean and under attack, from stored maps
    (`hsat.evaluate.attention.read_attention_maps`: (tensors, meta) per model). Columns are the
    validation patches (one per class); per model and condition, a row of the images, then one
    row per head with its map upsampled over the patch."""
    if not entries:
        return _no_data("Attention maps", "no ViT models with stored attention maps")
    blocks = []
    for tensors, meta in entries:
        eps = meta.get("eps", 0)
        for key, image_key, label in (("clean", "images", "clean"),
                                      ("adv", "adv_images", f"{str(meta.get('attack', 'pgd')).upper()} {eps:g}/255")):
            blocks.append((str(meta.get("model", "?")), label, np.asarray(tensors[image_key]).transpose(0, 2, 3, 1).clip(0, 1),
                           np.asarray(tensors[key])))
    n = max(b[2].shape[0] for b in blocks)
    rows = sum(1 + b[3].shape[1] for b in blocks)
    fig, axes = plt.subplots(rows, n, figsize=(1.05 * n + 1.6, 1.05 * rows), squeeze=False)
    classes = entries[0][1].get("classes", [])
    labels = np.asarray(entries[0][0]["labels"]).tolist()
    r = 0
    for model, label, images, maps in blocks:
        for i in range(n):
            ax = axes[r, i]
            if i < len(images):
                ax.imshow(images[i])
                if r == 0 and i < len(labels) and labels[i] < len(classes):
                    ax.set_title(_short(classes[labels[i]], 12, 1), fontsize=7)
        axes[r, 0].text(-0.15, 0.5, f"{model}\n{label}", transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
        for h in range(maps.shape[1]):
            for i in range(min(n, len(images))):
                m = maps[i, h]
                ax = axes[r + 1 + h, i]
                ax.imshow(images[i], alpha=0.35)
                ax.imshow(m / max(float(m.max()), 1e-12), cmap="inferno", alpha=0.75, interpolation="nearest",
                          extent=(-0.5, images.shape[2] - 0.5, images.shape[1] - 0.5, -0.5))
            axes[r + 1 + h, 0].text(-0.15, 0.5, f"head {h + 1}", transform=axes[r + 1 + h, 0].transAxes, ha="right",
                                    va="center", fontsize=7)
        r += 1 + maps.shape[1]
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle("Last-block attention from the class token, clean and under attack (each map scaled to its maximum)",
                 fontsize=8)
    fig.tight_layout()
    return fig


def language_similarity(language: pd.DataFrame) -> plt.Figure:
    """HLSS's interpretability heat maps (after Watawana et al., Figs. 3-5): per model and
    condition (clean, under attack), the mean cosine similarity of each class's validation
    samples (rows) to every class's markers (columns, grouped by class), minus that marker's mean
    over the rows (a marker every sample is close to says nothing about the class); the true
    class's markers are boxed, and each row's most similar marker is dotted."""
    if language is None or language.empty:
        return _no_data("HLSS marker similarity", "no HLSS models in the study (results/language.csv is empty)")
    panels = list(language.groupby(["model", "condition"], sort=False))
    models = list(dict.fromkeys(language["model"]))
    conditions = list(dict.fromkeys(language["condition"]))
    classes = list(dict.fromkeys(language["true_class"]))
    first = language[language["model"] == models[0]]
    columns = list(dict.fromkeys(zip(first["marker_class"], first["marker"])))
    fig, axes = plt.subplots(len(models), len(conditions), figsize=(0.32 * len(columns) * len(conditions) + 2.5,
                                                                    0.42 * len(classes) * len(models) + 1.8),
                             squeeze=False)
    for (model, condition), g in panels:
        ax = axes[models.index(model), conditions.index(condition)]
        mat = g.pivot_table(index="true_class", columns=["marker_class", "marker"], values="similarity", sort=False)
        mat = mat.reindex(index=[c for c in classes if c in mat.index], columns=pd.MultiIndex.from_tuples(columns))
        mat = mat - mat.mean(axis=0)
        sns.heatmap(mat.to_numpy(), ax=ax, cmap="RdBu_r", center=0.0, cbar=True,
                    cbar_kws={"shrink": 0.7, "label": "cosine − marker mean"},
                    xticklabels=[f"{c}: {m}" for c, m in columns], yticklabels=list(mat.index))
        for r, cls in enumerate(mat.index):
            cols = [j for j, (c, _) in enumerate(columns) if c == cls]
            if cols:
                ax.add_patch(plt.Rectangle((min(cols), r), len(cols), 1, fill=False, edgecolor="black", lw=1.4))
            best = int(np.nanargmax(mat.to_numpy()[r]))
            ax.plot(best + 0.5, r + 0.5, "o", color="gold", mec="black", ms=3.5)
        acc = g.groupby("true_class")["zero_shot_acc"].first().mean()
        eps = float(g["eps"].iloc[0])
        title = "clean" if condition == "clean" else f"{condition.upper()} {eps:g}/255 on the marker classifier"
        ax.set_title(f"{model} ({method_label(g['method'].iloc[0])}), {title}\nzero-shot marker MCA {acc:.1f} %", fontsize=8)
        ax.tick_params(axis="x", labelsize=5, rotation=90)
        ax.tick_params(axis="y", labelsize=7, rotation=0)
        ax.set_xlabel("markers (class: marker); boxed = the row's true class")
        ax.set_ylabel("true class")
    fig.tight_layout()
    return fig
