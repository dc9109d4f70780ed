"""Gated attention MIL on frozen features: learns where the slide signal is, and says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_evaluate import cli_study  # noqa: F401  (fixture)

from hsat.errors import HSATError
from hsat.evaluate.mil import mil_metrics, predict_mil, slide_bags, train_mil

torch.set_num_threads(1)


def _bags(n_slides: int, seed: int):
    """Two classes; a slide's label shows only in 2 of its 12 patches (feature 0 = +-3), the rest noise."""
    g = torch.Generator().manual_seed(seed)
    feats, labels, slides = [], [], []
    for s in range(n_slides):
        y = s % 2
        x = torch.randn(12, 8, generator=g)
        x[:2, 0] += 3.0 if y else -3.0
        feats.append(x)
        labels += [y] * 12
        slides += [f"s{seed}-{s}"] * 12
    return slide_bags(torch.cat(feats), torch.tensor(labels), slides)


def test_mil_finds_the_few_informative_patches():
    model = train_mil(_bags(40, 0), 2, epochs=15, lr=1e-3, seed=0)
    val = _bags(20, 1)
    probs = predict_mil(model, val)
    m = mil_metrics(probs, np.array([y for *_, y in val]), 2)
    assert m["acc"] >= 90 and m["auc"] >= 95, m
    # attention concentrates on the two patches that carry the label
    with torch.no_grad():
        _, w = model(val[0][1])
    assert float(w[:2].sum()) > 2 * 2 / 12


def test_mil_on_shuffled_labels_is_at_chance():
    bags = [(s, b, int(y)) for (s, b, _), y in zip(_bags(40, 0), np.random.default_rng(0).integers(0, 2, 40))]
    model = train_mil(bags, 2, epochs=15, lr=1e-3, seed=0)
    val = _bags(40, 1)
    m = mil_metrics(predict_mil(model, val), np.array([y for *_, y in val]), 2)
    assert m["acc"] < 75, m


def test_a_slide_with_two_labels_is_an_error():
    with pytest.raises(HSATError, match="slide 'a'"):
        slide_bags(torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "a"])


def test_cli_mil_writes_one_slide_level_row(cli_study):
    import pandas as pd

    from hsat.cli import main
    from hsat.evaluate.mil import MIL_COLUMNS

    root, run, manifest = cli_study
    emb = root / "emb" / "m1"
    assert main(["embed", "--run", str(run), "--manifest", str(manifest), "--config", str(root / "study.yaml"),
                 "--out", str(emb)]) == 0
    out = root / "mil" / "m1.csv"
    assert main(["mil", "--embeddings", str(emb), "--study", str(root / "study.yaml"), "--model", "m1", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == list(MIL_COLUMNS) and len(df) == 1
    assert df.loc[0, "level"] == "slide" and df.loc[0, "n_slides"] > 0 and 0 <= df.loc[0, "acc"] <= 100
    assert main(["mil", "--embeddings", str(emb), "--study", str(root / "study.yaml"), "--model", "nope",
                 "--out", str(root / "mil" / "x.csv")]) == 2
    assert not (root / "mil" / "x.csv").exists()
