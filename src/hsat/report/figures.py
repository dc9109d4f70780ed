"""Figures of the study (seaborn; PNG and PDF), drawn from the tidy CSVs and the run logs.

Every figure is always written -- with a "no data" note when its inputs are empty -- so the
workflow's outputs are the same for every study config.
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
from hsat.methods import METHODS  # noqa: E402
from hsat.report import method_label  # noqa: E402
from hsat.report.tables import _prepare_whitebox, _select_transfer, _transfer_cfg  # noqa: E402

log = logging.getLogger(__name__)

FIGURES = ("robust_accuracy", "transfer_heatmap", "training_curves", "embedding_map", "attack_steps")
"""Figure names; each is written as results/figures/<name>.png and .pdf."""


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
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight", metadata=_METADATA[ext])
        paths.append(path)
    plt.close(fig)
    return paths


def _no_data(title: str, why: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    return fig


# ----------------------------------------------------------------------------- figures


def robust_accuracy(whitebox: pd.DataFrame, study_cfg: Mapping[str, Any]) -> plt.Figure:
    """Accuracy against eps (clean at eps 0) per method, one panel per attack x level; sd over seeds."""
    if whitebox.empty:
        return _no_data("Robust accuracy", "no white-box results")
    df, classifier, objective = _prepare_whitebox(whitebox, study_cfg)
    clean = df[df["attack"] == "none"]
    attacks = [a for a in dict.fromkeys(df["attack"]) if a != "none"]
    # The clean point starts every attack's curve.
    parts = [df[df["attack"] != "none"]] + [clean.assign(attack=a) for a in attacks]
    plot = pd.concat(parts, ignore_index=True)
    plot["Method"] = plot["method"].map(method_label)
    plot["Level"] = plot["level"]
    levels = [lvl for lvl in LEVELS[::-1] if lvl in set(plot["level"])]
    g = sns.relplot(
        data=plot, x="eps", y="acc", hue="Method", style="group", col="Level", row="attack",
        col_order=levels, kind="line", marker="o", errorbar="sd", height=2.6, aspect=1.2,
        facet_kws={"margin_titles": True},
    )
    g.set_axis_labels("eps (1/255)", "accuracy (%)")
    g.figure.suptitle(f"Robust accuracy ({classifier} classifier, {objective} objective)", y=1.02)
    return g.figure


def _wrap_name(name: str, width: int = 10) -> str:
    """Break a long model name at underscores so tick labels stay narrow and never overlap."""
    lines, line = [], ""
    for part in str(name).split("_"):
        piece = part if not line else f"_{part}"
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = part
        else:
            line += piece
    return "\n".join([*lines, line])


def transfer_heatmap(transfer: pd.DataFrame, study_cfg: Mapping[str, Any] | None = None) -> plt.Figure:
    """Accuracy drop on each target (columns) of examples crafted on each surrogate (rows), per level.

    The colour scale is diverging and centred at 0 so a negative drop (the attack helped) never
    shares the colour of no effect; the size follows the number of models so labels stay legible.
    """
    if transfer.empty:
        return _no_data("Transfer", "no transfer results (evaluation.transfer.enabled is false?)")
    if study_cfg is not None:  # the configured setting only, as Table 2 shows it
        transfer = _select_transfer(transfer, _transfer_cfg(study_cfg))
    df = transfer.groupby(["level", "surrogate", "target"], sort=False)["acc_drop"].mean().reset_index()
    levels = [lvl for lvl in LEVELS[::-1] if lvl in set(df["level"])]
    models = sorted(set(df["surrogate"]) | set(df["target"]))
    side = 1.6 + 0.62 * len(models)
    fig, axes = plt.subplots(
        1, len(levels) + 1, figsize=(side * len(levels) + 1.0, side), squeeze=False,
        gridspec_kw={"width_ratios": [1.0] * len(levels) + [0.05]},
    )
    cbar_ax = axes[0][-1]
    vmax = float(np.nanmax(np.abs(df["acc_drop"]))) if df["acc_drop"].notna().any() else 0.0
    vmax = vmax or 1.0
    font = max(5.0, min(9.0, 60.0 / max(len(models), 1)))
    labels = [_wrap_name(m) for m in models]
    for i, (ax, level) in enumerate(zip(axes[0], levels)):
        mat = df[df["level"] == level].pivot(index="surrogate", columns="target", values="acc_drop")
        mat = mat.reindex(index=models, columns=models)
        sns.heatmap(
            mat, ax=ax, annot=True, fmt=".1f", annot_kws={"fontsize": font}, cmap="RdBu_r", center=0,
            vmin=-vmax, vmax=vmax, cbar=i == 0, cbar_ax=cbar_ax if i == 0 else None,
            cbar_kws={"label": "accuracy drop (points)"},
            xticklabels=labels, yticklabels=labels, square=True, linewidths=0.5, linecolor="white",
        )
        ax.grid(False)
        ax.set_facecolor("0.85")  # a pair not run (the diagonal) is grey, never the white of a zero drop
        ax.tick_params(axis="both", labelsize=font)
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0, va="center")
        ax.set_xticklabels(ax.get_xticklabels(), rotation=0, ha="center")
        ax.set_xlabel("target")
        ax.set_ylabel("surrogate" if i == 0 else "")
        ax.set_title(f"{level}: accuracy drop (points)")
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


def training_curves(runs_dir: str | Path, models: Sequence[str] | None = None) -> plt.Figure:
    """Clean and adversarial loss per level, and the eps schedule, against the optimiser step."""
    logs = read_run_logs(runs_dir, models)
    series = [c for c in logs.columns if c.startswith(("loss_clean_", "loss_adv_"))] + (["eps"] if "eps" in logs else [])
    if logs.empty or not series:
        return _no_data("Training curves", "no run logs with losses")
    order = [f"loss_{kind}_{lvl}" for kind in ("clean", "adv") for lvl in LEVELS if f"loss_{kind}_{lvl}" in series]
    order += [s for s in series if s not in order]
    long = logs.melt(id_vars=["model", "step"], value_vars=order, var_name="series", value_name="value").dropna()
    if long.empty:
        return _no_data("Training curves", "run logs hold no loss values")
    g = sns.relplot(
        data=long, x="step", y="value", hue="model", col="series", col_order=[s for s in order if s in set(long["series"])],
        col_wrap=min(4, len(order)), kind="line", height=2.3, aspect=1.3,
        facet_kws={"sharey": False},
    )
    g.set_titles("{col_name}")
    return g.figure


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


def embedding_map(
    embeddings_dir: str | Path, whitebox: pd.DataFrame | None = None, max_models: int = 4, max_points: int = 400, seed: int = 0,
    models: Sequence[str] | None = None,
) -> plt.Figure:
    """t-SNE of clean validation features (a subsample), coloured by class (top) and patient (bottom).

    One model per method (the first by name), methods in `hsat.methods.METHODS` order (HiDisc,
    HSAT, HSAT-Patch, ...), so the panels compare methods, at most `max_models`; only `models`
    when given.
    """
    emb_root = Path(embeddings_dir)
    study = models
    models = sorted(p.name for p in emb_root.iterdir() if p.is_dir()) if emb_root.is_dir() else []
    if study is not None:
        models = [m for m in models if m in study]
    if whitebox is not None and not whitebox.empty and {"model", "method"} <= set(whitebox.columns):
        order = {name: i for i, name in enumerate(METHODS)}  # registry order: baseline and full HSAT first
        firsts = whitebox.sort_values("model").drop_duplicates("method")
        firsts = firsts.assign(_rank=firsts["method"].map(order).fillna(len(order))).sort_values(["_rank", "model"])
        picked = [m for m in firsts["model"] if m in models]
        models = picked or models
    panels = []
    for model in models[:max_models]:
        emb = _load_embedding(emb_root / model, max_points, seed)
        if emb is not None:
            panels.append((model, emb))
    if not panels:
        return _no_data("Embedding map", "no embeddings found")
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 7), squeeze=False)
    for j, (model, emb) in enumerate(panels):
        for i, colour in enumerate(("label", "patient")):
            ax = axes[i][j]
            if colour in emb:
                sns.scatterplot(data=emb, x="x", y="y", hue=colour, s=8, ax=ax, legend=(colour == "label" and j == len(panels) - 1), linewidth=0)
            else:
                ax.scatter(emb["x"], emb["y"], s=8)
            ax.set_title(f"{model}: by {'class' if colour == 'label' else 'patient'}")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(""), ax.set_ylabel("")
    if axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1, 1), fontsize=7)
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
    """A check sweeps one numeric parameter (steps, eps, restart): draw accuracy against it."""
    if not sub["value_num"].notna().all():
        return False
    return "param" not in sub or sub["param"].astype(str).nunique() <= 1


def _sweep_panel(ax: plt.Axes, sub: pd.DataFrame, palette: Mapping[str, Any]) -> pd.Series:
    """Accuracy against the swept value, a line per model; returns each row's x."""
    for model, g in sub.groupby("model", sort=True):
        g = g.sort_values("value_num")
        ax.plot(g["value_num"], g["acc"], marker="o", color=palette[model], lw=1.2, ms=4)
    ax.set_xlabel(str(sub["param"].iloc[0]) if "param" in sub and sub["param"].notna().any() else "value")
    return sub["value_num"]


def _restarts_panel(ax: plt.Axes, sub: pd.DataFrame, palette: Mapping[str, Any]) -> pd.Series:
    """Each restart's accuracy, then the worst over restarts at its own tick (and dashed across)."""
    worst = (sub["param"].astype(str) == "worst_of") if "param" in sub else pd.Series(False, index=sub.index)
    x = _sweep_panel(ax, sub[~worst], palette).reindex(sub.index)
    restarts = sorted(sub.loc[~worst, "value_num"].dropna().unique())
    at = (restarts[-1] if restarts else 0) + 1
    x[worst] = at
    for _, row in sub[worst].iterrows():
        ax.axhline(row["acc"], ls="--", lw=0.8, color=palette[row["model"]])
        ax.scatter([at], [row["acc"]], marker="v", s=40, color=palette[row["model"]], zorder=4)
    ax.set_xticks([*restarts, at] if worst.any() else restarts)
    ax.set_xticklabels([f"{r:g}" for r in restarts] + (["worst"] if worst.any() else []))
    ax.set_xlabel("restart")
    return x


def _category_panel(ax: plt.Axes, sub: pd.DataFrame, palette: Mapping[str, Any]) -> pd.Series:
    """Points per model, one per row of the check (a surrogate, an attack setting); returns each row's x."""
    models = sorted(set(sub["model"]))
    x = pd.Series(np.nan, index=sub.index)
    for i, model in enumerate(models):
        g = sub[sub["model"] == model]
        x[g.index] = i + (np.linspace(-0.3, 0.3, len(g)) if len(g) > 1 else 0.0)
        ax.scatter(x[g.index], g["acc"], color=palette[model], s=18, zorder=3)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([_wrap_name(m) for m in models], fontsize=7)
    ax.set_xlim(-0.6, len(models) - 0.4)
    ax.set_xlabel("model (one point per setting)")
    return x


def attack_steps(sanity: pd.DataFrame) -> plt.Figure:
    """One panel per sanity check, showing its criterion; failed points marked with a red x.

    Sweeps (steps, eps, noise, restarts) are drawn against their parameter; checks whose rows are
    settings rather than a number (whitebox_vs_transfer, above_clean) as points per model. A
    panel's title says passed or FAILED (how many rows), so a failed check cannot hide in a grid.
    """
    if sanity.empty or not {"model", "check", "value", "acc"} <= set(sanity.columns):
        return _no_data("Attack sanity checks", "no sanity results")
    df = sanity.copy()
    df["passed"] = _passed(df["passed"]) if "passed" in df else True
    df["value_num"] = pd.to_numeric(df["value"], errors="coerce")
    df["acc"] = pd.to_numeric(df["acc"], errors="coerce")
    df["model"] = df["model"].astype(str)
    checks = list(dict.fromkeys(df["check"]))
    models = sorted(set(df["model"]))
    palette = dict(zip(models, sns.color_palette(n_colors=max(len(models), 1))))
    ncols = min(3, len(checks))
    nrows = math.ceil(len(checks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False)
    for ax, check in zip(axes.flat, checks):
        sub = df[df["check"] == check]
        if check == "restarts":
            x = _restarts_panel(ax, sub, palette)
        elif _is_sweep(sub):
            x = _sweep_panel(ax, sub, palette)
        else:
            x = _category_panel(ax, sub, palette)
        failed = ~sub["passed"]
        ax.scatter(x[failed], sub.loc[failed, "acc"], marker="x", s=80, color="red", zorder=5)
        n_failed = int((~sub["passed"]).sum())
        status = f"FAILED ({n_failed})" if n_failed else "passed"
        criterion = _criterion(sub)
        ax.set_title(f"{check}: {status}" + (f"\n{criterion}" if criterion else ""), fontsize=9, color="red" if n_failed else "black")
        ax.set_ylabel("accuracy (%)")
    for ax in list(axes.flat)[len(checks):]:
        ax.axis("off")
    handles = [Line2D([], [], color=palette[m], marker="o", lw=1.2, ms=4, label=m) for m in models]
    handles.append(Line2D([], [], color="red", marker="x", ls="", ms=8, label="failed"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
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
) -> list[Path]:
    """Write every figure of FIGURES as PNG and PDF under `out_dir`; return the paths. Run logs and
    embeddings are read for the study's models only (`study_cfg["models"]`, when it names them)."""
    study_models = list(study_cfg["models"]) if study_cfg.get("models") else None
    sns.set_theme(style="whitegrid", context="paper")
    figs = {
        "robust_accuracy": lambda: robust_accuracy(whitebox, study_cfg),
        "transfer_heatmap": lambda: transfer_heatmap(transfer, study_cfg),
        "training_curves": lambda: training_curves(runs_dir, study_models),
        "embedding_map": lambda: embedding_map(embeddings_dir, whitebox, models=study_models),
        "attack_steps": lambda: attack_steps(sanity),
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
