"""HLSS's interpretability (Watawana et al., Figs. 3-5): how close a sample's language-aligned
representation lies to each class's markers, clean and under attack.

For validation patches of every class, v (the HLSS head's unit-norm output in the text space) is
compared with every marker embedding (cosine similarity). A marker-based zero-shot classifier
scores class c by the mean similarity to c's markers; the attack is PGD on its cross-entropy
(random start), so "does a perturbation move a sample to another class's markers?" is measured
by the attack that tries exactly that. Results are tidy rows, one per (condition, true class,
marker), from which the report draws the heat maps.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from hsat.attacks import frozen, pgd
from hsat.precision import exact_fp32
from hsat.errors import HSATError

LANGUAGE_COLUMNS = ["model", "method", "group", "seed", "condition", "eps", "true_class", "marker_class", "marker",
                    "similarity", "zero_shot_acc", "n"]
"""Columns of results/language/<model>.csv and results/language.csv (a contract)."""


def class_scores(v: torch.Tensor, markers: torch.Tensor, marker_class: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N, D) unit representations -> (N, n_classes): mean cosine similarity to each class's markers."""
    sims = v @ markers.T  # (N, M)
    onehot = F.one_hot(marker_class, n_classes).to(sims.dtype)  # (M, C)
    return sims @ onehot / onehot.sum(0).clamp_min(1)


def pick_per_class(labels: Sequence[int], n_classes: int, per_class: int) -> list[int]:
    """Up to `per_class` indices of each class, spread evenly over that class's samples (and so
    over its patients, which the manifest lists one after another)."""
    labels = np.asarray(labels)
    out: list[int] = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            take = np.unique(np.linspace(0, len(idx) - 1, min(per_class, len(idx))).round().astype(int))
            out += idx[take].tolist()
    return out


def language_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, markers: torch.Tensor,
                  marker_classes: Sequence[str], marker_names: Sequence[str], classes: Sequence[str],
                  cfg: Mapping[str, Any], info: Mapping[str, Any], batch_size: int = 128,
                  generator: torch.Generator | None = None) -> pd.DataFrame:
    """Similarities of clean and attacked validation patches to every marker, as tidy rows."""
    missing = [c for c in classes if c not in set(marker_classes)]
    if missing:
        raise HSATError(f"the text embeddings have no markers for class(es) {missing}")
    device = x.device
    markers = markers.to(device, torch.float32)
    mclass = torch.tensor([list(classes).index(c) if c in classes else -1 for c in marker_classes], device=device)
    keep = mclass >= 0
    markers, mclass = markers[keep], mclass[keep]
    names = [n for n, k in zip(marker_names, keep.tolist()) if k]
    mcls_names = [c for c, k in zip(marker_classes, keep.tolist()) if k]
    n_classes = len(classes)
    temp = float(cfg["temperature"])
    eps = float(cfg["eps"])

    def represent(inp: torch.Tensor) -> torch.Tensor:
        return F.normalize(model(inp).float(), dim=-1)

    conditions: list[tuple[str, float, torch.Tensor]] = []
    model.eval()
    with torch.no_grad():
        clean = torch.cat([represent(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    conditions.append(("clean", 0.0, clean))
    adv_parts = []
    with frozen(model):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]

            def objective(x_adv: torch.Tensor, yb=yb) -> torch.Tensor:
                logits = class_scores(represent(x_adv), markers, mclass, n_classes) / temp
                return F.cross_entropy(logits, yb, reduction="sum")

            with exact_fp32():  # TF32 off on a GPU (hsat.precision)
                x_adv = pgd(xb, objective, eps=eps / 255, alpha=float(cfg["alpha"]) / 255, steps=int(cfg["steps"]),
                            random_start=True, generator=generator)
            with torch.no_grad():
                adv_parts.append(represent(x_adv))
    conditions.append(("pgd", eps, torch.cat(adv_parts)))

    rows = []
    y_np = y.cpu().numpy()
    for condition, e, v in conditions:
        sims = (v @ markers.T).cpu().numpy()  # (N, M)
        pred = class_scores(v, markers, mclass, n_classes).argmax(1).cpu().numpy()
        for c, cname in enumerate(classes):
            sel = y_np == c
            if not sel.any():
                continue
            acc = 100.0 * float((pred[sel] == c).mean())
            mean_sims = sims[sel].mean(0)
            for j, (mc, mn) in enumerate(zip(mcls_names, names)):
                rows.append({**info, "condition": condition, "eps": e, "true_class": cname, "marker_class": mc,
                             "marker": mn, "similarity": float(mean_sims[j]), "zero_shot_acc": acc, "n": int(sel.sum())})
    return pd.DataFrame(rows, columns=LANGUAGE_COLUMNS)


def language_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per model and condition: zero-shot accuracy (mean over classes = MCA, and over samples) and
    the own-marker margin (mean similarity to the true class's markers minus to the others')."""
    rows = []
    for (model, method, group, seed, condition, eps), g in df.groupby(
            ["model", "method", "group", "seed", "condition", "eps"], sort=False, dropna=False):
        per_class = g.groupby("true_class").agg(acc=("zero_shot_acc", "first"), n=("n", "first"))
        own = g[g["marker_class"] == g["true_class"]].groupby("true_class")["similarity"].mean()
        other = g[g["marker_class"] != g["true_class"]].groupby("true_class")["similarity"].mean()
        rows.append({"model": model, "method": method, "group": group, "seed": seed, "condition": condition, "eps": eps,
                     "zero_shot_mca": float(per_class["acc"].mean()),
                     "zero_shot_acc": float((per_class["acc"] * per_class["n"]).sum() / per_class["n"].sum()),
                     "own_margin": float((own - other).mean())})
    return pd.DataFrame(rows)
