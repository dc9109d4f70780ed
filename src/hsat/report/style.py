"""How the report shows methods and models: one colour per method and one display label per model,
the same in every figure and table, so a reader matches a curve to a row by name and colour.

Colours are keyed by the method registry's display labels (`hsat.methods.METHODS`), so a method
keeps its colour whatever else a study or a figure holds. A model's label is its series (the models
a table row pools: same group, method and backbone) and its seed, e.g. "HSAT s1"; a method's
second series (another group or backbone) says what differs, e.g. "DINO (resnet10t) s0".
"""

from __future__ import annotations

import zlib
from typing import Iterable

import pandas as pd

from hsat.methods import METHODS, method_label

PALETTE: tuple[str, ...] = (
    "#4363d8", "#e6194b", "#3cb44b", "#f58231", "#911eb4", "#42d4f4", "#a9a9a9", "#000000",
    "#808000", "#469990", "#f032e6", "#9a6324", "#000075", "#800000", "#bfef45", "#ffe119",
)
"""Distinguishable colours (after Trubetskoy's 20 distinct colours, pale ones left out), given to
the registered methods in registry order; the rest go to names the registry does not hold."""

SEED_LINESTYLES: tuple[str | tuple[int, tuple[int, ...]], ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
"""Line styles by seed (cycled): a method's seeds share its colour and differ in dashes."""

MODEL_INFO_COLUMNS = ("model", "method", "group", "backbone", "seed")


def method_colours(labels: Iterable[str] = ()) -> dict[str, str]:
    """Colour of every registered method's display label, plus of `labels` the registry lacks.

    An unregistered label takes a spare colour chosen from its own text (not from what else is
    drawn), so a custom variant keeps one colour across figures too.
    """
    registered = [e.label for e in METHODS.values()]
    colours = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(registered)}
    spare = PALETTE[len(registered):] or PALETTE
    for label in labels:
        label = str(label)
        if label not in colours:
            colours[label] = spare[zlib.crc32(label.encode("utf-8")) % len(spare)]
    return colours


def method_order(labels: Iterable[str]) -> list[str]:
    """`labels` in registry order, unregistered ones after in their own order."""
    rank = {e.label: i for i, e in enumerate(METHODS.values())}
    labels = list(dict.fromkeys(str(label) for label in labels))
    return sorted(labels, key=lambda label: (rank.get(label, len(rank)), labels.index(label)))


def seed_linestyle(seed: int) -> str | tuple[int, tuple[int, ...]]:
    return SEED_LINESTYLES[int(seed) % len(SEED_LINESTYLES)]


def model_names(info: pd.DataFrame) -> pd.DataFrame:
    """Display names of models, one row each, in display order (methods in registry order, each
    method's canonical series first, then seeds).

    `info` has the columns `MODEL_INFO_COLUMNS` and optionally `custom`: how many settings differ
    from the method's plain entry. A method's canonical series is the one with the most models
    (seeds), then the fewest such settings, then the first listed; its lowest seed is the method's
    canonical model (the one a figure shows when it shows one model per method). Adds
    method_label, series, label and canonical.
    """
    missing = [c for c in MODEL_INFO_COLUMNS if c not in info.columns]
    if missing:
        raise ValueError(f"model_names: info lacks column(s) {', '.join(missing)}")
    df = info.drop_duplicates("model").reset_index(drop=True).copy()
    if df.empty:
        return df.assign(method_label="", series="", label="", canonical=False, custom=0)
    if "custom" not in df:
        df["custom"] = 0
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").fillna(0).astype(int)
    df["method"] = df["method"].astype(str)
    df["group"] = df["group"].fillna("").astype(str)
    df["backbone"] = df["backbone"].fillna("").astype(str)
    df["method_label"] = df["method"].map(method_label)
    df["_listed"] = range(len(df))
    rank = {name: i for i, name in enumerate(METHODS)}
    df["_method"] = df["method"].map(rank).fillna(len(rank))
    series = df.groupby(["method", "group", "backbone"], sort=False).agg(
        custom=("custom", "min"), size=("model", "size"), listed=("_listed", "min")).reset_index()
    series = series.assign(_size=-series["size"]).sort_values(["method", "_size", "custom", "listed"], kind="stable")
    series["_series"] = series.groupby("method").cumcount()
    first = series[series["_series"] == 0].set_index("method")
    series["series"] = [_series_label(row, first.loc[row["method"]]) for _, row in series.iterrows()]
    df = df.merge(series[["method", "group", "backbone", "series", "_series"]], on=["method", "group", "backbone"])
    df["label"] = df["series"] + " s" + df["seed"].astype(str)
    df = df.sort_values(["_method", "_series", "seed", "_listed"], kind="stable").reset_index(drop=True)
    df["canonical"] = ~df.duplicated("method") & (df["_series"] == 0)
    return df.drop(columns=["_listed", "_method", "_series"])


def _series_label(series: pd.Series, canonical: pd.Series) -> str:
    """The method's label, with what sets a second series apart from the canonical one."""
    label = method_label(series["method"])
    differs = [series[c] for c in ("group", "backbone") if series[c] != canonical[c] and series[c]]
    return f"{label} ({', '.join(differs)})" if differs else label


VARIANT_MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X")
"""Markers of a method's second, third ... series (another group or backbone); its canonical one has none."""


def model_styles(names: pd.DataFrame) -> pd.DataFrame:
    """How a figure draws each model of `model_names`: its method's colour, its seed's line style,
    and a marker when it is not of its method's canonical series. Adds colour, linestyle, marker."""
    colours = method_colours(names["method_label"])
    out = names.copy()
    if out.empty:
        return out.assign(colour="", linestyle="", marker="")
    out["colour"] = out["method_label"].map(colours)
    out["linestyle"] = [seed_linestyle(s) for s in out["seed"]]
    variant = out.groupby("method_label", sort=False)["series"].transform(lambda s: s.map({v: i for i, v in enumerate(dict.fromkeys(s))}))
    out["marker"] = ["" if v == 0 else VARIANT_MARKERS[(v - 1) % len(VARIANT_MARKERS)] for v in variant]
    return out
