"""Attack sanity checks: an honest non-robust model passes; a gradient-masking one is caught."""

from __future__ import annotations

import torch
from test_evaluate import ToyModel, ToyPatches, toy_cfg, toy_setup

from hsat.evaluate import SANITY_COLUMNS, sanity_checks

torch.set_num_threads(1)


def test_sanity_checks_pass_for_an_honest_model():
    model, probe, bank, val = toy_setup()
    df = sanity_checks(model, probe, bank, val, toy_cfg(), model_name="toy", progress=False)
    assert list(df.columns) == list(SANITY_COLUMNS)
    assert {"clean", "steps", "steps_feature_knn", "restarts", "eps", "noise"} == set(df["check"])
    assert df["passed"].map(type).eq(bool).all()
    assert df["passed"].all(), df[~df["passed"]]
    steps = df[df.check == "steps"]
    assert steps["value"].tolist() == [1, 3, 6]
    eps = df[df.check == "eps"].sort_values("value")
    assert eps["acc"].iloc[-1] <= 100 / 3  # falls to chance or below at the largest eps
    noise = df[df.check == "noise"]["acc"]
    assert (noise > 80).all()  # uniform noise barely hurts the toy model
    assert len(df[df.check == "restarts"]) == 2


def test_gradient_masking_is_flagged_not_raised():
    model, probe, bank, val = toy_setup()
    masked = ToyModel(masked=True)  # same function, zero input gradient
    df = sanity_checks(masked, probe, bank, val, toy_cfg(), model_name="masked", progress=False)
    eps = df[df.check == "eps"].sort_values("value")
    assert not eps["passed"].iloc[-1]  # the attack cannot reach chance even at 64/255
    assert not df["passed"].all()
