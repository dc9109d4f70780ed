"""Evaluation: kNN, metrics, aggregation, linear probe, white-box sweep, embeddings, CLI round trip.

A toy problem keeps these fast: 3 classes whose images differ by +0.04 in one colour channel,
and a "model" whose backbone features are the centred channel means (one affine layer). Its
clean accuracy is perfect and an 8/255 attack flips it: a non-robust model by construction.
"""

from __future__ import annotations

import itertools
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.utils.data import Dataset

import hsat.evaluate as ev
from hsat.evaluate.sweep import autoattack
from hsat.precision import effective_precision
from hsat.errors import HSATError
from hsat.evaluate import (
    WHITEBOX_COLUMNS,
    aggregate,
    classification_metrics,
    LinearProbe,
    fit_linear_probe,
    knn_predict,
    level_metrics,
    stratified_subset,
    whitebox_sweep,
)

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- toy problem


class ToyModel(nn.Module):
    """HSATModel-like: encode = affine map of the centred channel means."""

    def __init__(self, masked: bool = False):
        super().__init__()
        self.proj = nn.Linear(3, 3)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(3))
            self.proj.bias.zero_()
        self.head = nn.Linear(3, 2)
        self.num_features = 3
        self.masked = masked  # zero input gradient: a gradient-masking model
        self.calls = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.masked:
            x = x.detach() + 0.0 * x
        return self.proj(x.mean((2, 3)) - 0.5)

    def project(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(f), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.encode(x))


class ToyPatches(Dataset):
    """Items like hsat.data.sampler.PatchDataset: class c brightens channel c by 0.04."""

    def __init__(self, n_patients: int = 6, slides: int = 2, patches: int = 3, seed: int = 0, size: int = 8, tag: str = "v"):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for p in range(n_patients):
            label = p % 3
            for s in range(slides):
                for k in range(patches):
                    img = 0.5 + 0.01 * torch.randn(3, size, size, generator=g)
                    img[label] += 0.04
                    self.items.append((img.clamp(0, 1), label, f"{tag}P{p}", f"{tag}P{p}-S{s}", f"/{tag}/P{p}/S{s}/{k}.png"))
        self.labels = np.array([it[1] for it in self.items])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, label, patient, slide, path = self.items[i]
        return {"image": img, "label": label, "patient": patient, "slide": slide, "path": path, "index": i}


def toy_cfg(**whitebox) -> dict:
    wb = {"attacks": ["pgd"], "eps": [8], "alpha": 2, "steps": 10, "objectives": ["feature", "linear_ce"], "classifiers": ["knn", "linear"]}
    wb.update(whitebox)
    return {"batch_size": 16, "max_val_patches": None, "attack_precision": "fp32", "knn": {"k": 10, "temperature": 0.07},
            "linear": {"epochs": 200, "lr": 0.05, "weight_decay": 0.0}, "whitebox": wb,
            "sanity": {"steps": [1, 3, 6], "eps": [2, 8, 64], "restarts": 2}}


def toy_setup(seed: int = 0):
    """(model, probe, bank, val_dataset) for the toy problem; bank/probe from clean train features."""
    model = ToyModel()
    train = ToyPatches(seed=seed + 1, tag="t")
    emb = ev.embed(model, train, batch_size=16, progress=False)
    probe = fit_linear_probe(emb["features"], emb["labels"], 3, epochs=200, lr=0.05, weight_decay=0.0)
    return model, probe, (emb["features"], emb["labels"]), ToyPatches(seed=seed + 2, tag="v")


# ----------------------------------------------------------------------------- kNN


def _knn_bruteforce(query, bank, labels, C, k, T):
    out = np.zeros((len(query), C))
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    for i, q in enumerate(query):
        sims = bn @ (q / np.linalg.norm(q))
        top = sorted(range(len(bank)), key=lambda j: -sims[j])[: min(k, len(bank))]
        for j in top:
            out[i, labels[j]] += np.exp(sims[j] / T)
        out[i] /= out[i].sum()
    return out


@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_predict_matches_bruteforce(k):
    g = torch.Generator().manual_seed(k)
    query, bank = torch.randn(13, 6, generator=g), torch.randn(20, 6, generator=g) * 3
    labels = torch.randint(0, 4, (20,), generator=g)
    got = knn_predict(query, bank, labels, 4, k=k, temperature=0.5, batch_size=4)
    want = _knn_bruteforce(query.double().numpy(), bank.double().numpy(), labels.numpy(), 4, k, 0.5)
    assert got.shape == (13, 4)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- metrics


def test_mca_is_balanced_accuracy_and_hand_check():
    labels = np.array([0, 0, 0, 1])
    scores = np.array([[0.9, 0.1, 0], [0.8, 0.2, 0], [0.3, 0.7, 0], [0.1, 0.9, 0]])
    m = classification_metrics(scores, labels, 3)
    assert m["acc"] == pytest.approx(75.0)
    assert m["mca"] == pytest.approx(100 * (2 / 3 + 1) / 2)  # recall 2/3 for class 0, 1 for class 1
    assert m["top2"] == pytest.approx(100.0)
    assert m["confusion"].tolist() == [[2, 1, 0], [0, 1, 0], [0, 0, 0]]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    s = rng.random((200, 5))
    assert classification_metrics(s, y, 5)["mca"] == pytest.approx(100 * balanced_accuracy_score(y, s.argmax(1)))


def test_metrics_handle_absent_classes():
    y = np.array([0, 0, 2, 2])  # class 1 absent from the split
    s = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    m = classification_metrics(s, y, 3)
    assert np.isfinite([m["acc"], m["mca"], m["top2"], m["top3"], m["map"]]).all()
    assert m["top3"] == 100.0
    assert m["mca"] == pytest.approx(75.0)


def test_aggregate_sums_patch_probabilities_by_group():
    scores = np.array([[0.6, 0.4], [0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    groups = ["s2", "s1", "s1", "s2", "s2"]
    labels = [0, 1, 1, 0, 0]
    gs, gl, keys = aggregate(scores, groups, labels)
    assert keys == ["s1", "s2"]
    assert gl.tolist() == [1, 0]
    np.testing.assert_allclose(gs, [[0.3 / 2, 1.7 / 2], [1.9 / 3, 1.1 / 3]])
    # A slide whose single confident patch is outvoted by its other patches.
    gs, _, _ = aggregate(np.array([[0.99, 0.01], [0.4, 0.6], [0.4, 0.6]]), ["a", "a", "a"], [1, 1, 1])
    assert gs.argmax(1).tolist() == [0]
    with pytest.raises(Exception, match="mixes labels"):
        aggregate(scores, ["a"] * 5, labels)


def test_level_metrics_levels():
    scores = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])
    labels = [0, 0, 1, 2, 2, 2]
    m = level_metrics(scores, labels, ["p1", "p1", "p2", "p3", "p3", "p3"], ["a", "b", "c", "d", "d", "e"], 3)
    assert set(m) == {"patch", "slide", "patient"}
    assert m["patch"]["acc"] == pytest.approx(100 * 4 / 6)
    assert m["slide"]["acc"] == pytest.approx(60.0)  # b and e wrong
    assert m["patient"]["acc"] == pytest.approx(100.0)  # summed votes fix p1 and p3


def test_stratified_subset_is_deterministic_and_balanced():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    a = stratified_subset(labels, 10, seed=0)
    assert a == stratified_subset(labels, 10, seed=0) and len(a) == 10
    assert np.bincount(labels[a]).tolist() == [5, 3, 2]
    assert stratified_subset(labels, None) is None and stratified_subset(labels, 1000) is None
    assert np.bincount(labels[stratified_subset(labels, 3)]).tolist() == [1, 1, 1]


def _cohort(slide_sizes: dict[str, list[int]]) -> tuple[np.ndarray, list[str], list[str]]:
    """(labels, slides, patients) per patch: patient P<i> of class i % 3 with slides of the given sizes."""
    labels, slides, patients = [], [], []
    for i, (patient, sizes) in enumerate(slide_sizes.items()):
        for s, size in enumerate(sizes):
            labels += [i % 3] * size
            slides += [f"{patient}-S{s}"] * size
            patients += [patient] * size
    return np.array(labels), slides, patients


UNEVEN = {f"P{i}": [2 + i % 4, 5, 1 + 3 * (i % 2)][: 1 + i % 3] for i in range(9)}
"""Nine patients with one to three slides of 1 to 5 patches: 18 slides, 66 patches."""


def test_slide_stratified_subset_takes_every_slide_and_patient():
    labels, slides, patients = _cohort(UNEVEN)
    n_slides = len(set(slides))
    for n in (n_slides, n_slides + 7, 40):
        chosen = ev.slide_stratified_subset(labels, slides, n, seed=0, patients=patients)
        assert len(chosen) == n and chosen == sorted(set(chosen))
        cov = ev.subset_coverage(slides, patients, chosen)
        assert cov == {"patches": n, "slides": n_slides, "patients": 9, "slides_total": n_slides, "patients_total": 9}
        # round-robin: a slide holds fewer than the most-sampled slide only when it has nothing left
        taken = pd.Series(np.asarray(slides)[chosen]).value_counts()
        size = pd.Series(slides).value_counts()
        short = taken.reindex(size.index) < taken.max() - 1
        assert (taken.reindex(size.index)[short] == size[short]).all()
    assert ev.slide_stratified_subset(labels, slides, None) is None
    assert ev.slide_stratified_subset(labels, slides, len(labels)) is None


def test_slide_stratified_subset_is_deterministic_and_ids_are_values():
    labels, slides, patients = _cohort(UNEVEN)
    a = ev.slide_stratified_subset(labels, slides, 25, seed=3, patients=patients)
    assert a == ev.slide_stratified_subset(labels, slides, 25, seed=3, patients=patients)
    # the same cohort with its ids as text (a manifest's label names) gives the same subset
    named = np.array(["a", "b", "c"])[labels]
    assert a == ev.slide_stratified_subset(named, pd.Series(slides, dtype=object), 25, seed=3, patients=list(patients))
    assert a != ev.slide_stratified_subset(labels, slides, 25, seed=4, patients=patients)  # the seed draws within slides


def test_slide_stratified_subset_below_the_slide_count_warns_and_spreads(caplog):
    labels, slides, patients = _cohort(UNEVEN)
    with caplog.at_level("WARNING", logger="hsat.evaluate.metrics"):
        chosen = ev.slide_stratified_subset(labels, slides, 7, seed=0, patients=patients)
    cov = ev.subset_coverage(slides, patients, chosen)
    assert cov["slides"] == 7 and cov["patients"] == 7 and cov["slides_total"] == 18  # one slide per patient first
    assert sorted(np.bincount(labels[chosen]).tolist()) == [2, 2, 3]  # classes take turns
    assert "leaves 11 of 18 validation slides" in caplog.text and "at least 18" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hsat.evaluate.metrics"):
        ev.slide_stratified_subset(labels, slides, 18, seed=0, patients=patients)
    assert "validation slides" not in caplog.text
    with pytest.raises(HSATError, match="slide ids"):
        ev.slide_stratified_subset(labels, slides[:-1], 5)


def test_every_attack_stage_draws_the_same_positions(cli_study):
    """The embeddings' subset (every CLI stage), the dataset's (library callers) and the manifest's
    (the tables' coverage) are one subset: example ids line up across models and attacks."""
    from hsat.cli import main

    root, run, manifest = cli_study
    emb_dir = root / "emb_positions" / "m1"
    assert main(["embed", "--run", str(run), "--manifest", str(manifest), "--config", str(root / "study.yaml"),
                 "--out", str(emb_dir)]) == 0
    emb = ev.load_embeddings(emb_dir)
    (val,), _ = ev.datasets(manifest, 32, ("val",), run)
    for cap in (14, 3):
        cfg = {"max_val_patches": cap}
        positions = ev.attacked_positions(emb, cfg)
        assert positions == ev.attack_subset(val, cfg) and len(positions) == cap
        val_index = emb.val_index
        assert ev.attacked_coverage(manifest, cfg) == ev.subset_coverage(val_index["slide"], val_index["patient"], positions)
    cov = ev.attacked_coverage(manifest, {"max_val_patches": 14})
    assert cov["slides"] == cov["slides_total"] and cov["patients"] == cov["patients_total"]


# ----------------------------------------------------------------------------- probe, embeddings


def test_linear_probe_fits_separable_problem_deterministically():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.randn(90, 5, generator=g) * 0.3 + 100.0  # large offset: standardisation matters
    x[torch.arange(90), y] += 1.0
    p1 = fit_linear_probe(x, y, 3, epochs=150, lr=0.05, weight_decay=0.0)
    p2 = fit_linear_probe(x, y, 3, epochs=150, lr=0.05, weight_decay=0.0)
    assert (p1(x).argmax(1) == y).float().mean() == 1.0
    assert torch.equal(p1.linear.weight, p2.linear.weight)
    assert not any(p.requires_grad for p in p1.parameters())


def test_embeddings_round_trip(tmp_path):
    model, probe, bank, val = toy_setup()
    tr = ev.embed(model, ToyPatches(seed=1, tag="t"), batch_size=7, progress=False)
    va = ev.embed(model, val, batch_size=7, progress=False)
    assert tr["features"].shape == (36, 3) and tr["features"].dtype == torch.float32
    ev.write_embeddings(tmp_path / "emb", tr, va, probe, ["a", "b", "c"], {"image_size": 8})
    emb = ev.load_embeddings(tmp_path / "emb")
    assert torch.equal(emb.train_features, tr["features"]) and torch.equal(emb.val_labels, va["labels"])
    assert emb.val_index["path"].tolist() == va["path"]
    assert emb.classes == ["a", "b", "c"]
    x = torch.randn(4, 3)
    assert torch.equal(emb.probe(x), probe(x))
    with pytest.raises(Exception, match="hsat embed"):
        ev.load_embeddings(tmp_path / "missing")


# ----------------------------------------------------------------------------- white-box sweep


def test_whitebox_sweep_rows_and_attack_lowers_accuracy():
    model, probe, bank, val = toy_setup()
    cfg = toy_cfg(attacks=["pgd", "bim", "mifgsm"], eps=[4, 8])
    df = whitebox_sweep(model, probe, bank, val, cfg, model_name="toy", method="hidisc", group="g", seed=3, progress=False)
    assert list(df.columns) == list(WHITEBOX_COLUMNS)
    n_specs = 3 * 2 * 2
    n_worst = 2  # one worst case per eps
    assert len(df) == (1 + n_specs + n_worst) * 2 * 3
    key = ["attack", "eps", "objective", "classifier", "level"]
    assert not df.duplicated(key).any()
    # BIM and MI-FGSM take a random start (and the _r name) under the label-free feature objective only.
    assert set(df.loc[df.objective == "feature", "attack"]) == {"pgd", "bim_r", "mifgsm_r"}
    assert set(df.loc[df.objective == "linear_ce", "attack"]) == {"pgd", "bim", "mifgsm"}
    clean = df[(df.attack == "none") & (df.level == "patch")].set_index("classifier")["acc"]
    assert (clean > 90).all()
    for clf in ("knn", "linear"):
        for obj in ("feature", "linear_ce"):
            adv = df[(df.attack == "pgd") & (df.eps == 8) & (df.objective == obj) & (df.classifier == clf) & (df.level == "patch")]["acc"].item()
            assert adv < clean[clf] - 30, (clf, obj, adv)
    assert set(df.level) == {"patch", "slide", "patient"}
    assert (df[df.attack == "none"][["eps", "steps"]] == 0).all().all()
    assert df["model"].eq("toy").all() and df["seed"].eq(3).all()


def test_clean_bank_is_never_recomputed(monkeypatch):
    """Forward passes = batches x (1 clean + per config: steps + 1 scoring); no bank embedding."""
    model, probe, bank, val = toy_setup()
    monkeypatch.setattr(ev, "embed", lambda *a, **k: pytest.fail("whitebox_sweep re-embedded the bank"))
    n_batches = -(-len(val) // 16)
    counts = []
    for attacks in (["pgd"], ["pgd", "bim", "mifgsm"]):
        cfg = toy_cfg(attacks=attacks, eps=[4, 8])
        cfg["sanity"]["enabled"] = False  # its restarts would add specs to the sweep
        model.calls = 0
        whitebox_sweep(model, probe, bank, val, cfg, progress=False)
        n_cfg = len(attacks) * 2 * 2
        assert model.calls == n_batches * (1 + n_cfg * (cfg["whitebox"]["steps"] + 1))  # clean once per batch
        counts.append(model.calls)
    assert counts[1] > counts[0]


def test_whitebox_subset_and_autoattack():
    pytest.importorskip("torchattacks")
    model, probe, bank, val = toy_setup()
    cfg = toy_cfg(attacks=["autoattack"], eps=[8], classifiers=["linear"])
    cfg["max_val_patches"] = 9
    df = whitebox_sweep(model, probe, bank, val, cfg, progress=False)
    patch = df[df.level == "patch"].set_index("attack")["acc"]
    assert patch["autoattack"] < patch["none"] - 30
    assert set(df.objective) == {"none", ev.AUTOATTACK_OBJECTIVE, "all"}  # all: the worst case


def _interval_probe(n_classes: int) -> tuple[LinearProbe, torch.Tensor]:
    """A probe on ToyModel's first feature (the red mean - 0.5) that gives class c the interval of
    width 0.1 around m_c (tangents of x^2/2, scaled), and the m_c."""
    centres = (torch.arange(n_classes, dtype=torch.float32) - (n_classes - 1) / 2) * 0.1
    probe = LinearProbe(3, n_classes)
    with torch.no_grad():
        probe.linear.weight.zero_()
        probe.linear.weight[:, 0] = 100 * centres
        probe.linear.bias.copy_(-100 * centres**2 / 2)
    return probe, centres


@pytest.mark.parametrize("version", ["apgd-ce+apgd-t", "standard"])
@pytest.mark.parametrize("n_classes", [2, 3, 4, 7])
def test_autoattack_runs_on_two_or_more_classes(n_classes, version):
    """Patches at a class centre lie 0.05 from the boundary, beyond what eps 8/255 moves the mean
    (0.031): they survive APGD-CE and reach APGD-T (whose targeted DLR loss needs four classes);
    patches 0.045 from the centre are within reach and must fall."""
    pytest.importorskip("torchattacks")
    probe, centres = _interval_probe(n_classes)
    labels = torch.arange(n_classes).repeat(2)
    step = torch.where(labels == n_classes - 1, -0.045, 0.045)  # towards a neighbouring class
    red = 0.5 + centres[labels] + torch.cat([torch.zeros(n_classes), step[n_classes:]])
    x = torch.full((2 * n_classes, 3, 4, 4), 0.5)
    x[:, 0] = red[:, None, None]
    model = ToyModel()
    assert (probe(model.encode(x)).argmax(1) == labels).all()
    adv = autoattack(model, probe, 8 / 255, version, steps=10, seed=0)(x, labels)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 8 / 255 + 1e-6 and 0 <= adv.min() and adv.max() <= 1
    correct = probe(model.encode(adv)).argmax(1) == labels
    assert correct[:n_classes].all() and not correct[n_classes:].any(), correct


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def cli_study(tiny_manifest, tmp_path_factory):
    """A hand-built run directory (test_resnet) and a tiny study config."""
    import yaml

    from hsat.models import build_model, save_weights

    root = tmp_path_factory.mktemp("study")
    run = root / "runs" / "m1"
    run.mkdir(parents=True)
    run_cfg = {"seed": 0, "data": {"image_size": 32}, "model": {"backbone": "test_resnet", "head_hidden": [16], "embed_dim": 8}}
    (run / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    torch.manual_seed(0)
    save_weights(build_model("test_resnet", head_hidden=(16,), embed_dim=8), run / "model.safetensors")
    study = {
        "models": {"m1": {"group": "scratch", "seed": 4, "method": {"name": "hidisc"}}},
        "evaluation": {"batch_size": 16, "max_val_patches": 14, "knn": {"k": 5},
                       "linear": {"epochs": 20},
                       "whitebox": {"attacks": ["pgd", "bim"], "eps": [8], "steps": 2, "objectives": ["feature", "linear_ce"]},
                       "transfer": {"steps": 2},
                       "sanity": {"steps": [1, 2], "eps": [8, 64], "restarts": 2}},
    }
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    return root, run, tiny_manifest


def test_cli_embed_evaluate_sanity(cli_study):
    from hsat.cli import main

    root, run, manifest = cli_study
    emb = root / "emb" / "m1"
    assert main(["embed", "--run", str(run), "--manifest", str(manifest), "--config", str(root / "study.yaml"), "--out", str(emb)]) == 0
    for name in ("features.safetensors", "index.csv", "probe.safetensors", "meta.json"):
        assert (emb / name).is_file()
    out = root / "whitebox" / "m1.csv"
    common = ["--run", str(run), "--manifest", str(manifest), "--embeddings", str(emb), "--config", str(root / "study.yaml"), "--model", "m1"]
    assert main(["evaluate", *common, "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == list(WHITEBOX_COLUMNS)
    assert len(df) == (1 + 2 * 2 + 1) * 2 * 3  # clean, 2 attacks x 2 objectives, the worst case
    assert set(df["method"]) == {"hidisc"} and set(df["group"]) == {"scratch"} and set(df["seed"]) == {4}
    assert df[["acc", "mca"]].apply(lambda c: c.between(0, 100)).all().all()
    san = root / "sanity" / "m1.csv"
    assert main(["sanity", *common, "--out", str(san)]) == 0
    s = pd.read_csv(san)
    # `attack_precision: auto` (the default) crafts in bf16 where the CPU runs it natively, and then
    # the sanity checks compare it with fp32 crafting.
    low = effective_precision("auto", "cpu") != "fp32"
    assert {"steps", "steps_feature_knn", "converged", "restarts", "eps", "large_eps_label", "large_eps_feature", "noise",
            *(["precision"] if low else [])} == set(s["check"])
    # Unknown model name: exit 2 with a message, nothing written.
    bad = root / "whitebox" / "nope.csv"
    assert main(["evaluate", *common[:-1], "nope", "--out", str(bad)]) == 2
    assert not bad.exists()



def test_embeddings_of_other_weights_are_refused(cli_study, tmp_path, capsys):
    import shutil

    from hsat.cli import main
    from hsat.models import build_model, save_weights

    root, run, manifest = cli_study
    emb = tmp_path / "emb"
    cfg = ["--config", str(root / "study.yaml")]
    assert main(["embed", "--run", str(run), "--manifest", str(manifest), *cfg, "--out", str(emb)]) == 0
    retrained = tmp_path / "m1"
    shutil.copytree(run, retrained)
    torch.manual_seed(1)
    save_weights(build_model("test_resnet", head_hidden=(16,), embed_dim=8), retrained / "model.safetensors")
    out = tmp_path / "wb.csv"
    common = ["--manifest", str(manifest), "--embeddings", str(emb), *cfg, "--model", "m1", "--out", str(out)]
    assert main(["evaluate", "--run", str(retrained), *common]) == 2
    err = capsys.readouterr().err
    assert "embedded from other weights" in err and str(retrained / "model.safetensors") in err
    assert not out.exists()


def test_chained_verbs_give_what_the_verbs_give_alone(cli_study):
    """`hsat embed ... --then evaluate ...` (the workflow's one job per model) writes the same
    embeddings and rows as the two verbs run one after the other; a failing stage stops the chain."""
    from hsat.cli import main, split_chain

    root, run, manifest = cli_study
    cfg = ["--config", str(root / "study.yaml")]
    rows = {}
    for how in ("alone", "chained"):
        emb, out = root / how / "emb", root / how / "m1.csv"
        embed = ["embed", "--run", str(run), "--manifest", str(manifest), *cfg, "--out", str(emb)]
        evaluate = ["evaluate", "--run", str(run), "--manifest", str(manifest), "--embeddings", str(emb), *cfg,
                    "--model", "m1", "--out", str(out)]
        if how == "alone":
            assert main(embed) == 0 and main(evaluate) == 0
        else:
            assert main([*embed, "--then", *evaluate]) == 0
        rows[how] = pd.read_csv(out)
        rows[how + "_features"] = (emb / "features.safetensors").read_bytes()
    pd.testing.assert_frame_equal(rows["alone"], rows["chained"])
    assert rows["alone_features"] == rows["chained_features"]
    # A stage that fails (unknown model) returns 2 and the stage after it never runs.
    after = root / "never" / "m1.csv"
    bad = ["evaluate", "--run", str(run), "--manifest", str(manifest), "--embeddings", str(root / "alone" / "emb"),
           *cfg, "--model", "nope", "--out", str(root / "never" / "bad.csv")]
    good = [*bad[:-3], "m1", "--out", str(after)]
    assert main([*bad, "--then", *good]) == 2
    assert not after.exists()
    assert split_chain(["a", "-x", "--then", "b"]) == [["a", "-x"], ["b"]]
    with pytest.raises(SystemExit):
        split_chain(["a", "--then"])


# ----------------------------------------------------------------------------- worst case, adaptive attacks


def test_random_start_bim_leaves_the_zero_gradient_start_of_a_feature_objective():
    """At x the feature objective's gradient is round-off noise (1e-9 against 1e-2 one random
    start away), so BIM's first step from x follows noise; BIM-R's first step climbs."""
    model, probe, bank, val = toy_setup()
    batch = [val[i] for i in range(12)]
    x = torch.stack([b["image"] for b in batch])
    y = torch.tensor([b["label"] for b in batch])
    f = model.encode(x).detach()
    obj = ev.make_objective("feature", model, probe, f, y)

    def mean_abs_grad(xs):
        xg = xs.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(obj(xg), xg)
        return grad.abs().mean().item()

    start = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1) * 8 / 255).clamp(0, 1)
    assert mean_abs_grad(x) < 1e-4 * mean_abs_grad(start)
    with ev.eval_frozen(model):
        from_x = ev.craft_batch(model, probe, x, y, ev.AttackSpec("bim", 8, 1, "feature"), f, torch.Generator().manual_seed(0))
        from_r = ev.craft_batch(model, probe, x, y, ev.AttackSpec("bim_r", 8, 1, "feature"), f, torch.Generator().manual_seed(0))
    assert (from_r - x).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        assert obj(from_r) > 2 * obj(from_x)
    assert ev.AttackSpec("bim_r", 8, 1, "feature").random_start and not ev.AttackSpec("bim", 8, 1, "feature").random_start
    assert ev.attack_name("bim", "feature") == "bim_r" and ev.attack_name("bim", "knn_soft") == "bim"


def test_soft_knn_is_the_kNN_vote_over_the_whole_bank():
    _, _, (feats, labels), _ = toy_setup()
    query = feats[:7] + 0.01 * torch.randn(7, 3, generator=torch.Generator().manual_seed(1))
    soft = ev.SoftKNN(feats, labels, 3, temperature=0.07)
    hard = knn_predict(query, feats, labels, 3, k=len(feats), temperature=0.07)
    assert torch.allclose(soft(query).exp(), hard, atol=1e-5)
    assert torch.allclose(soft(query).exp().sum(1), torch.ones(7), atol=1e-5)


def test_knn_soft_attack_defeats_the_kNN_it_copies():
    model, probe, bank, val = toy_setup()
    cfg = toy_cfg(objectives=["knn_soft"], classifiers=["knn"], steps=10)
    df = whitebox_sweep(model, probe, bank, val, cfg, progress=False)
    patch = df[(df.level == "patch") & (df.classifier == "knn")].set_index("attack")["acc"]
    assert patch["pgd"] < patch["none"] - 50


def test_worst_case_is_the_per_example_and_of_every_attack():
    labels = np.array([0, 0, 1, 1])
    right = np.eye(2)[labels]
    wrong = np.eye(2)[1 - labels]
    a = np.stack([right[0], wrong[1], right[2], right[3]])  # attack A fools patch 1
    b = np.stack([right[0], right[1], right[2], wrong[3]])  # attack B fools patch 3
    specs = [ev.AttackSpec("pgd", 8, 5, "feature"), ev.AttackSpec("bim", 8, 5, "linear_ce"),
             ev.AttackSpec("noise", 8, 0, "none")]
    res = ev.AttackResults(labels=labels, patients=["p0", "p0", "p1", "p1"], slides=["s0", "s1", "s2", "s3"],
                           paths=[""] * 4, positions=list(range(4)), clean={"knn": right},
                           adv=[{"knn": a}, {"knn": b}, {"knn": wrong}], specs=specs)
    rows = {r["level"]: r for r in ev.worst_case_rows(res)}
    assert rows["patch"]["acc"] == 50.0  # patches 0 and 2 survive both attacks; noise is not an attack
    assert rows["patch"]["mca"] == 50.0
    assert rows["slide"]["acc"] == 50.0
    # patient p0 = patches 0, 1: under A their summed vote ties (argmax picks class 0: correct).
    assert rows["patient"]["acc"] == 50.0 and rows["patient"]["objective"] == "all"
    assert {r["attack"] for r in rows.values()} == {"worst_case"}


def test_worst_case_at_an_eps_includes_the_attacks_at_smaller_eps():
    labels = np.array([0, 1])
    right, wrong = np.eye(2)[labels], np.eye(2)[1 - labels]
    fools_first = np.stack([wrong[0], right[1]])
    specs = [ev.AttackSpec("pgd", 4, 5, "feature"), ev.AttackSpec("pgd", 8, 5, "feature")]
    res = ev.AttackResults(labels=labels, patients=["p0", "p1"], slides=["s0", "s1"], paths=[""] * 2,
                           positions=[0, 1], clean={"knn": right}, adv=[{"knn": fools_first}, {"knn": right}],
                           specs=specs)
    acc = {r["eps"]: r["acc"] for r in ev.worst_case_rows(res) if r["level"] == "patch"}
    assert acc == {4.0: 50.0, 8.0: 50.0}  # the 4/255 example lies in the 8/255 ball too


def test_group_worst_case_lets_each_patch_take_its_own_worst_attack():
    # One slide of three class-0 patches: A fools only patch 0, B only patch 1. Each attack alone
    # leaves 2 of 3 votes right; patch 0 under A with patch 1 under B outvotes the true class.
    labels = np.zeros(3, dtype=int)
    right, wrong = np.eye(2)[labels], np.eye(2)[1 - labels]
    a = np.stack([wrong[0], right[1], right[2]])
    b = np.stack([right[0], wrong[1], right[2]])
    for attack_arrays in ([a], [b], [a, b]):
        correct, _ = ev.worst_case_correct([right, *attack_arrays], labels, groups=["s"] * 3)
        assert correct.tolist() == ([False] if len(attack_arrays) == 2 else [True])


def test_group_worst_case_equals_brute_force_over_every_patch_by_patch_choice():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n_versions, n_classes = 3, 3
        groups = ["g0"] * 3 + ["g1"] * 2 + ["g2"] * 3
        labels = np.array([0] * 3 + [1] * 2 + [2] * 3)
        arrays = [rng.dirichlet(np.ones(n_classes) * 0.7, size=len(labels)) for _ in range(n_versions)]
        arrays[0][np.arange(len(labels)), labels] += 0.5  # a clean array that is mostly right
        got, group_labels = ev.worst_case_correct(arrays, labels, groups=groups)
        expected = []
        for g in ("g0", "g1", "g2"):
            idx = [i for i, x in enumerate(groups) if x == g]
            ok = True
            for choice in itertools.product(range(n_versions), repeat=len(idx)):
                total = sum(arrays[v][i] for v, i in zip(choice, idx))
                ok &= int(np.argsort(-total, kind="stable")[0]) == labels[idx[0]]
            expected.append(ok)
        assert got.tolist() == expected and group_labels.tolist() == [0, 1, 2]


def test_worst_case_rows_never_exceed_any_attack_or_clean():
    model, probe, bank, val = toy_setup()
    cfg = toy_cfg(attacks=["pgd", "bim"], eps=[2, 4], steps=3, objectives=["feature", "linear_ce", "knn_soft"])
    df = whitebox_sweep(model, probe, bank, val, cfg, progress=False)
    for (clf, level), g in df.groupby(["classifier", "level"]):
        for eps in (2.0, 4.0):
            worst = g[(g.attack == "worst_case") & (g.eps == eps)]["acc"].item()
            others = g[((g.attack != "worst_case") & (g.eps == eps)) | (g.attack == "none")]["acc"]
            assert worst <= others.min() + 1e-9, (clf, level, eps)


def test_autoattack_apgd_version_only_on_listed_models():
    pytest.importorskip("torchattacks")
    model, probe, bank, val = toy_setup()
    cfg = toy_cfg(attacks=["autoattack"], eps=[8], classifiers=["linear"],
                  autoattack={"version": "apgd-ce+apgd-t", "steps": 10, "models": ["toy"]})
    cfg["max_val_patches"] = 9
    df = whitebox_sweep(model, probe, bank, val, cfg, model_name="toy", progress=False)
    patch = df[df.level == "patch"].set_index("attack")["acc"]
    assert patch["autoattack"] < patch["none"] - 30
    assert patch["worst_case"] <= patch["autoattack"]
    other = whitebox_sweep(model, probe, bank, val, cfg, model_name="not_listed", progress=False)
    assert "autoattack" not in set(other.attack)


def test_spec_random_starts_do_not_depend_on_the_other_specs():
    model, probe, bank, val = toy_setup()
    one = whitebox_sweep(model, probe, bank, val, toy_cfg(attacks=["pgd"], eps=[4]), progress=False)
    many = whitebox_sweep(model, probe, bank, val, toy_cfg(attacks=["pgd", "bim"], eps=[2, 4]), progress=False)
    key = ["attack", "eps", "objective", "classifier", "level"]
    a = one[one.attack == "pgd"].set_index(key)["acc"]
    b = many.set_index(key)["acc"].reindex(a.index)
    pd.testing.assert_series_equal(a, b)


class ToyBNModel(ToyModel):
    """ToyModel with batch norm on its features: training mode would show in every score."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.eval()

    def encode(self, x):
        return self.bn(super().encode(x))


@pytest.mark.parametrize("attacks", [["autoattack"], ["pgd", "autoattack", "bim"]])
def test_attacks_leave_batch_norm_alone_and_clean_scores_match_a_plain_eval(attacks):
    """Regression: torchattacks restores the mode it found its classifier in, and a fresh wrapper
    module is in training mode: the encoder's batch norm then scored every later batch with batch
    statistics and overwrote its running ones. Clean scores of a sweep with AutoAttack must equal
    a plain eval-mode scoring, batch by batch, and the stored statistics must not move."""
    pytest.importorskip("torchattacks")
    _, probe, bank, val = toy_setup()
    model = ToyBNModel()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.01)
        model.bn.running_var.fill_(0.5)
    stats = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    cfg = toy_cfg(attacks=attacks, eps=[8], classifiers=["linear"],
                  autoattack={"version": "apgd-ce+apgd-t", "steps": 5})
    cfg["batch_size"] = 4  # several batches: the ones after the first AutoAttack call are the test
    df = whitebox_sweep(model, probe, bank, val, cfg, progress=False)
    assert torch.equal(model.bn.running_mean, stats[0]) and torch.equal(model.bn.running_var, stats[1])
    assert not model.training
    with torch.no_grad():
        feats = torch.cat([model.encode(b["image"]) for b in ev.embeddings.loader(val, 4)])
        labels = np.concatenate([np.asarray(b["label"]) for b in ev.embeddings.loader(val, 4)])
    expected = (probe(feats).argmax(1).numpy() == labels).mean() * 100
    clean = df[(df.attack == "none") & (df.level == "patch")]["acc"].item()
    assert clean == pytest.approx(expected)


def test_an_attack_that_leaves_training_mode_on_is_an_error(monkeypatch):
    model, probe, bank, val = toy_setup()
    real = ev.sweep.craft_batch

    def sloppy(model_, *args, **kw):
        out = real(model_, *args, **kw)
        model_.train()
        return out

    monkeypatch.setattr(ev.sweep, "craft_batch", sloppy)
    with pytest.raises(HSATError, match="training mode"):
        whitebox_sweep(model, probe, bank, val, toy_cfg(), progress=False)


# ----------------------------------------------------------------------------- step size


def test_step_size_rule_scales_alpha_to_cross_the_ball():
    """alpha = max(alpha, alpha_scale * eps / steps): the default sweep's 5 steps at 8/255 step 4/255,
    the paper's 10 steps keep its 2/255 at 4 and 8/255, and alpha_scale 0 turns the rule off."""
    from hsat.attacks import step_size
    from hsat.config import read_yaml, resolve_evaluation
    from hsat.evaluate.mil import mil_specs
    from hsat.evaluate.sanity import sanity_specs

    assert step_size(2, 8, 5, 2.5) == 4.0 and step_size(2, 4, 5, 2.5) == 2.0 and step_size(2, 8, 5, 0) == 2.0
    default = resolve_evaluation({})
    assert {(s.eps, s.alpha) for s in ev.whitebox_specs(default)} == {(4.0, 2.0), (8.0, 4.0)}
    paper = resolve_evaluation(read_yaml("config/opensrh.yaml")["evaluation"])
    assert {s.alpha for s in ev.whitebox_specs(paper)} == {2.0}
    off = resolve_evaluation({"whitebox": {"alpha_scale": 0}})
    assert {s.alpha for s in ev.whitebox_specs(off)} == {2.0}
    # every evaluation attack at the sweep's eps and steps takes the sweep's step
    sweep = {(s.eps, s.steps): s.alpha for s in ev.whitebox_specs(default) if s.attack != "autoattack"}
    others = [s for specs in sanity_specs(default).values() for s in specs if s.attack != "noise"]
    others += mil_specs(resolve_evaluation({"mil": {"enabled": True}}))
    shared = [s for s in others if (s.eps, s.steps) in sweep]
    assert shared and all(s.alpha == sweep[s.eps, s.steps] for s in shared)
    big = [s for s in sanity_specs(default)["large_eps_feature"]]
    assert big[0].alpha == 2.5 * big[0].eps / big[0].steps
