"""Natural shifts: each family's contract (identity at severity 0, [0, 1], shape, seeded per
example), the HED colour space, the adversarial stain against random stains, the sweep's rows and
checks, and `hsat shift` on a tiny run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import hsat.evaluate as ev
from hsat.errors import HSATError
from hsat.evaluate.shift import (
    ADVERSARIAL_STAIN,
    SHIFT_COLUMNS,
    SHIFTS,
    adversarial_stain,
    apply_shift,
    hed_stain_transform,
    hed_to_rgb,
    rgb_to_hed,
    shift_checks,
    shift_sweep,
    srh_channel_transform,
)
from test_evaluate import cli_study, toy_cfg, toy_setup  # noqa: F401  (cli_study: fixture)

torch.set_num_threads(1)


def _images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 0.9 + 0.05


@pytest.mark.parametrize("family", sorted(SHIFTS))
def test_each_family_keeps_the_contract(family):
    x = _images()
    pos = [3, 7, 11, 20]
    assert apply_shift(family, x, 0, pos) is x  # severity 0: the identity
    for sev in (1, 5):
        y = apply_shift(family, x, sev, pos, seed=1)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x)
        assert torch.equal(y, apply_shift(family, x, sev, pos, seed=1))  # deterministic
    # Per example: a patch's shift does not depend on its batch.
    y = apply_shift(family, x, 3, pos, seed=1)
    assert torch.allclose(apply_shift(family, x[1:3], 3, pos[1:3], seed=1), y[1:3], atol=1e-6)


@pytest.mark.parametrize("family", ["hed_stain", "channel_gain", "gaussian_noise", "brightness"])
def test_random_families_draw_their_parameters_per_example_and_seed(family):
    x = _images(1).expand(2, -1, -1, -1).contiguous()
    y = apply_shift(family, x, 4, [0, 1], seed=0)
    assert not torch.allclose(y[0], y[1])  # two positions, two draws
    assert not torch.allclose(y, apply_shift(family, x, 4, [0, 1], seed=5))


def test_bad_family_or_severity_is_an_error():
    with pytest.raises(HSATError, match="unknown shift family"):
        apply_shift("sepia", _images(), 1, range(4))
    with pytest.raises(HSATError, match="severity"):
        apply_shift("jpeg", _images(), 6, range(4))


def test_hed_round_trip_and_skimage_agreement():
    x = _images(2)
    assert torch.allclose(hed_to_rgb(rgb_to_hed(x)), x, atol=1e-5)
    assert torch.allclose(hed_stain_transform(x, torch.ones(2, 3), torch.zeros(2, 3)), x, atol=1e-5)
    color = pytest.importorskip("skimage.color")
    hwc = x[0].permute(1, 2, 0).double().numpy()
    ref = color.rgb2hed(hwc)
    ours = rgb_to_hed(x[:1].double())[0].permute(1, 2, 0).numpy()
    assert np.allclose(np.maximum(ours, 0), ref, atol=1e-9)  # skimage clamps at zero, we do not
    assert np.allclose(hed_to_rgb(torch.from_numpy(ref).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy(),
                       color.hed2rgb(ref), atol=1e-9)


def test_srh_channel_transform_moves_the_difference_channel_with_the_raw_ones():
    from hsat.data.srh import srh_to_rgb

    raw = torch.randint(5000, 30000, (2, 8, 8), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    x = srh_to_rgb(raw)[None]
    gain, offset = torch.tensor([[1.2, 0.9]]), torch.tensor([[0.01, -0.02]])
    shifted_raw = torch.stack([raw[0] * 1.2 + 0.01 * 65536, raw[1] * 0.9 - 0.02 * 65536])
    assert torch.allclose(srh_channel_transform(x, gain, offset), srh_to_rgb(shifted_raw)[None], atol=1e-5)


def test_adversarial_stain_finds_at_least_the_worst_random_stain():
    model, probe, bank, val = toy_setup()
    x = torch.stack([val[i]["image"] for i in range(len(val))])
    y = torch.tensor([val[i]["label"] for i in range(len(val))])
    pos = list(range(len(val)))

    def logits(xa):
        return probe(model.encode(xa))

    def acc(xs):
        with torch.no_grad():
            return float((logits(xs).argmax(1) == y).float().mean())

    for kind, families in (("rgb", ["hed_stain"]), ("srh", ["channel_gain", "channel_offset"])):
        sev = 3
        random = [acc(apply_shift(f, x, sev, pos, seed=s)) for f in families for s in range(5)]
        adv = adversarial_stain(x, y, logits, kind, sev, pos, steps=5, seed=0)
        assert acc(adv) <= min(random)
        assert acc(adv) < acc(x)  # it does find something
        assert adv.min() >= 0 and adv.max() <= 1


def test_shift_sweep_rows_identity_and_checks():
    model, probe, bank, val = toy_setup()
    cfg = {**toy_cfg(), "shift": {"families": ["hed_stain", "gaussian_noise", ADVERSARIAL_STAIN], "severities": [0, 1, 5],
                                  "adversarial_steps": 3}}
    df = shift_sweep(model, probe, bank, val, cfg, kind="rgb", model_name="toy", method="hidisc", progress=False)
    assert list(df.columns) == list(SHIFT_COLUMNS)
    assert set(df["attack"]) == {"none", "hed_stain", "gaussian_noise", ADVERSARIAL_STAIN, "worst_case"}
    # clean + 3 families x 3 severities + worst case at severities 1 and 5; 2 classifiers x 3 levels
    assert len(df) == (1 + 9 + 2) * 2 * 3
    clean = df[df["attack"] == "none"].set_index(["classifier", "level"])["acc"]
    zero = df[df["severity"] == 0]
    for r in zero[zero["attack"] != "none"].itertuples():
        assert r.acc == clean[(r.classifier, r.level)]
    wc = df[df["attack"] == "worst_case"]
    for r in wc.itertuples():
        at = df[(df["attack"] != "worst_case") & (df["severity"] <= r.severity) & (df["classifier"] == r.classifier)
                & (df["level"] == "patch")]
        if r.level == "patch":
            assert r.acc <= at["acc"].min() + 1e-9
    adv = df[(df["attack"] == ADVERSARIAL_STAIN) & (df["classifier"] == "linear") & (df["level"] == "patch")]
    rnd = df[(df["attack"] == "hed_stain") & (df["classifier"] == "linear") & (df["level"] == "patch")]
    assert (adv.set_index("severity")["acc"] <= rnd.set_index("severity")["acc"]).all()
    checks = shift_checks(df, {"patch": len(val), "slide": 12, "patient": 6})
    assert list(checks.columns) == list(ev.SANITY_COLUMNS)
    assert set(checks["check"]) == {"shift_identity", "shift_monotone"}
    assert checks.loc[checks["check"] == "shift_identity", "passed"].all()


def test_shift_checks_fail_on_a_leak_or_a_rise():
    rows = []
    for attack, sev, acc in (("none", 0, 80.0), ("jpeg", 0, 79.0), ("jpeg", 1, 60.0), ("jpeg", 2, 90.0)):
        rows.append({"model": "m", "method": "", "group": "", "seed": 0, "attack": attack, "severity": sev, "steps": 0,
                     "objective": "none", "classifier": "linear", "level": "patch", "acc": acc, "mca": acc,
                     "top2": acc, "top3": acc, "map": acc})
    checks = shift_checks(pd.DataFrame(rows), {"patch": 200})
    got = checks.set_index(["check", "value"])["passed"]
    assert not got[("shift_identity", 0)]  # 79 != 80: severity 0 is not the clean input
    assert got[("shift_monotone", 1)] and not got[("shift_monotone", 2)]  # 60 -> 90 is far beyond 2 SE


def test_cli_shift_writes_the_documented_columns(cli_study, tmp_path):
    import yaml

    from hsat.cli import main

    root, run, manifest = cli_study
    study = yaml.safe_load((root / "study.yaml").read_text())
    study["evaluation"]["shift"] = {"families": ["channel_gain", "jpeg", ADVERSARIAL_STAIN], "severities": [0, 2],
                                    "adversarial_steps": 2}
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(study))
    emb = tmp_path / "emb"
    assert main(["embed", "--run", str(run), "--manifest", str(manifest), "--study", str(cfg), "--out", str(emb)]) == 0
    out, san = tmp_path / "shift" / "m1.csv", tmp_path / "shift_sanity" / "m1.csv"
    common = ["--run", str(run), "--manifest", str(manifest), "--embeddings", str(emb), "--study", str(cfg), "--model", "m1"]
    assert main(["shift", *common, "--out", str(out), "--sanity", str(san)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == list(SHIFT_COLUMNS)
    assert set(df["attack"]) == {"none", "channel_gain", "jpeg", ADVERSARIAL_STAIN, "worst_case"}
    assert set(df["level"]) == {"patch", "slide", "patient"} and set(df["classifier"]) == {"knn", "linear"}
    assert set(df["method"]) == {"hidisc"} and set(df["seed"]) == {4}
    assert df["acc"].between(0, 100).all()
    s = pd.read_csv(san)
    assert s.loc[s["check"] == "shift_identity", "passed"].all()
    # Unknown model: exit 2, nothing written.
    bad = tmp_path / "shift" / "nope.csv"
    assert main(["shift", *common[:-1], "nope", "--out", str(bad)]) == 2
    assert not bad.exists()


def test_image_kind_is_read_off_the_first_validation_patch(cli_study, tmp_path):
    from PIL import Image

    from hsat.evaluate.runs import image_kind

    root, run, manifest = cli_study
    (val_ds,), _ = ev.datasets(manifest, 32, ("val",), run)
    assert image_kind(val_ds) == "srh"  # the embedded cohort stores 2-channel SRH TIFFs
    assert image_kind(val_ds, "rgb") == "rgb"
    png = tmp_path / "he.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png)
    assert image_kind([{"path": png}]) == "rgb"
