"""The embedded cohort: OpenSRH layout, determinism, classes, split without leakage, safe writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hsat import CLASSES
from hsat.data.opensrh import build_manifest
from hsat.data.srh import read_image, read_srh_raw
from hsat.data.synthetic import SynthParams, synthesize_cohort
from hsat.errors import HSATError


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_patch_readback(tiny_cohort):
    meta = json.loads((tiny_cohort / "meta" / "opensrh.json").read_text())
    split = json.loads((tiny_cohort / "meta" / "train_val_split.json").read_text())
    assert len(meta) == 14 and set(split) >= {"train", "val"}
    patient, info = next(iter(meta.items()))
    slide, sinfo = next(iter(info["slides"].items()))
    key = "normal_patches" if info["class"] == "normal" else "tumor_patches"
    rel = sinfo[key][0]
    assert rel.startswith(f"studies/{patient}/{slide}/patches/") and rel.endswith(".tif")
    raw = read_srh_raw(tiny_cohort / rel)
    assert raw.dtype == np.uint16 and raw.shape == (2, 32, 32)
    img = read_image(tiny_cohort / rel)
    assert img.shape == (3, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert float(img.std()) > 0.01  # not a blank image


def test_every_class_present_and_split_without_leakage(tiny_cohort):
    df = build_manifest(tiny_cohort)
    assert set(df["label"]) == set(CLASSES)
    assert df.groupby("patient")["split"].nunique().max() == 1
    for cls in CLASSES:  # each class has 2 patients here, so one in each split
        assert set(df[df["label"] == cls]["split"]) == {"train", "val"}
    assert len(df) == 14 * 2 * 6


def test_deterministic_and_seed_dependent(tmp_path):
    kw = dict(patients=7, slides=1, patches=3, size=16)
    a = _digest(synthesize_cohort(tmp_path / "a", seed=3, **kw))
    b = _digest(synthesize_cohort(tmp_path / "b", seed=3, **kw))
    c = _digest(synthesize_cohort(tmp_path / "c", seed=4, **kw))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_hierarchy_patient_and_slide_signal(tmp_path):
    """Simple colour statistics identify a patch's patient and slide far above chance."""
    root = synthesize_cohort(tmp_path / "h", patients=14, slides=2, patches=8, size=32, seed=0)
    df = build_manifest(root)
    x = np.stack([np.concatenate([im.mean(dim=(1, 2)).numpy(), im.std(dim=(1, 2)).numpy()])
                  for im in map(read_image, df["path"])])
    x = (x - x.mean(0)) / x.std(0)
    for level, n_groups in (("patient", 14), ("slide", 28)):
        groups = df[level].to_numpy()
        hits = 0
        for i in range(len(df)):  # leave-one-out nearest group centroid
            keep = np.arange(len(df)) != i
            names = np.unique(groups[keep])
            cents = np.stack([x[keep & (groups == g)].mean(0) for g in names])
            hits += names[np.argmin(((cents - x[i]) ** 2).sum(1))] == groups[i]
        assert hits / len(df) > 3.0 / n_groups, level


def test_refuses_foreign_directory_and_replaces_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(HSATError, match="foreign"):
        synthesize_cohort(foreign, patients=7, slides=1, patches=1, size=16)
    assert (foreign / "thesis.docx").read_text() == "precious"
    own = synthesize_cohort(tmp_path / "own", patients=7, slides=1, patches=1, size=16, seed=1)
    synthesize_cohort(own, patients=7, slides=1, patches=2, size=16, seed=1)
    assert len(build_manifest(own)) == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "own"]  # no temp folders left


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    import hsat.data.synthetic as synthetic

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_swap_into_place", boom)
    with pytest.raises(KeyboardInterrupt):
        synthesize_cohort(tmp_path / "c", patients=7, slides=1, patches=1, size=16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw", [dict(patients=6), dict(val_fraction=1.0), dict(slides=0), dict(size=4)])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(HSATError):
        synthesize_cohort(tmp_path / "c", **{"patches": 1, "size": 16, **kw})


def test_texture_amplitude_is_a_few_levels(tmp_path):
    """The class texture lives at a few /255 of the converted image, inside an 8/255 budget."""
    p = SynthParams()
    assert 0.5 <= p.texture_amplitude <= 6.0
    flat = SynthParams(texture_amplitude=0.0)
    a = synthesize_cohort(tmp_path / "a", patients=7, slides=1, patches=4, size=32, seed=0)
    b = synthesize_cohort(tmp_path / "b", patients=7, slides=1, patches=4, size=32, seed=0, params=flat)
    da, db = build_manifest(a), build_manifest(b)
    diff = np.stack([(read_image(x) - read_image(y))[2].numpy() for x, y in zip(da["path"], db["path"])])
    assert 0.3 / 255 < diff.std() < 8 / 255  # blue = CH3: exactly the texture


def test_thousands_of_patches(tmp_path):
    # Its speed is measured by `hsat bench` (report["synth"]), not asserted here.
    synthesize_cohort(tmp_path / "big", patients=42, slides=2, patches=24, size=32)
    assert len(list((tmp_path / "big" / "studies").glob("*/*/patches/*.tif"))) == 42 * 2 * 24


def test_synth_params_overrides_and_errors():
    from hsat.data.synthetic import synth_params

    p = synth_params({"texture_amplitude": 3, "class_texture": {"hgg": [0.1, "v"]}})
    assert p.texture_amplitude == 3.0 and p.class_texture["hgg"] == (0.1, "v")
    assert p.class_texture["lgg"] == SynthParams().class_texture["lgg"]  # the other classes kept
    assert synth_params({}) == SynthParams()
    for bad, key in (({"texture_amp": 1}, "texture_amp"), ({"noise_sd": "x"}, "noise_sd"),
                     ({"class_texture": {"glioma": [0.1, "h"]}}, "class_texture")):
        with pytest.raises(HSATError, match=key):
            synth_params(bad, source="overlay.yaml")


def test_cli_set_reaches_the_generator_and_bad_keys_exit_2(tmp_path):
    import subprocess
    import sys

    def synth(out, *sets):
        cmd = [sys.executable, "-m", "hsat", "synth", "--out", str(out), "--patients", "7", "--patches", "1",
               "--slides", "1", "--size", "16", *[f"--set={s}" for s in sets]]
        return subprocess.run(cmd, capture_output=True, text=True)

    ok = synth(tmp_path / "a", "texture_amplitude=2.5", "intensity_gain=2")
    assert ok.returncode == 0, ok.stderr
    params = json.loads((tmp_path / "a" / "meta" / "synthetic.json").read_text())["params"]
    assert params["texture_amplitude"] == 2.5 and params["intensity_gain"] == 2.0
    bad = synth(tmp_path / "b", "texture_amp=1")
    assert bad.returncode == 2 and "texture_amp" in bad.stderr and not (tmp_path / "b").exists()


def test_cue_measurement_follows_the_generation_knobs():
    """The measured amplitudes move with the knobs that set them: the texture's RMS with
    texture_amplitude, the nearest-class intensity distance with intensity_gain."""
    from hsat.data.cues import measure_cues

    kw = dict(patients=14, slides=1, patches=4, size=32)
    base = measure_cues(SynthParams(), **kw)
    assert abs(base["texture_rms"] - SynthParams().texture_amplitude) < 1.0
    assert abs(measure_cues(SynthParams(texture_amplitude=2.0), **kw)["texture_rms"] - 2.0) < 0.5
    weak = measure_cues(SynthParams(intensity_gain=1.0, intensity_sd_scale=1.0), **kw)
    strong = measure_cues(SynthParams(intensity_gain=3.0, intensity_sd_scale=0.2), **kw)
    assert min(strong["intensity_nearest"].values()) > 2 * min(weak["intensity_nearest"].values())
    assert max(strong["intensity_patient_sd"].values()) < max(weak["intensity_patient_sd"].values())


def test_default_cohort_has_robust_cues_above_and_a_fragile_cue_below_the_budget():
    """The default study's cohort (its patients, measured through 32 px crops) carries
    class cues no 8/255 perturbation can forge -- every class's mean channel intensities more
    than 3 x eps from its nearest class's, nuclei more than 3 x eps against their background --
    and a class texture whose amplitude stays below eps (what a non-robust encoder can exploit)."""
    from hsat.config import validate
    from hsat.data.cues import measure_cues

    eps = 8.0  # /255, the study's largest attack budget
    synth = validate({}, "synth")
    cues = measure_cues(SynthParams(), patients=synth["patients"], slides=synth["slides"], patches=8, size=32)
    assert min(cues["intensity_nearest"].values()) > 3 * eps, cues["intensity_nearest"]
    assert cues["nuclear_contrast"] > 3 * eps
    assert cues["texture_rms"] < eps
