"""Transfer: the target scores exactly the surrogate's stored float32 examples; mismatches are refused."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from test_evaluate import ToyModel, ToyPatches, cli_study, toy_cfg, toy_setup  # noqa: F401 (fixture)

import hsat.evaluate as ev
from hsat.errors import HSATError
from hsat.transfer import (
    TRANSFER_COLUMNS,
    craft,
    evaluate_transfer,
    load_adversarial,
    save_adversarial,
    whitebox_vs_transfer,
)

torch.set_num_threads(1)
TRANSFER = {"attack": "pgd", "eps": 8, "steps": 10, "objective": "feature", "classifier": "knn"}


class Recorder(ToyModel):
    """A target that records every input batch of encode."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.proj.weight.mul_(2.0)  # a different model from the surrogate
        self.seen: list[torch.Tensor] = []

    def encode(self, x):
        self.seen.append(x.detach().clone())
        return super().encode(x)


def _embeddings(model, train, val, classes=("a", "b", "c")) -> ev.Embeddings:
    tr = ev.embed(model, train, batch_size=16, progress=False)
    va = ev.embed(model, val, batch_size=16, progress=False)
    probe = ev.fit_linear_probe(tr["features"], tr["labels"], 3, epochs=100, lr=0.05)
    index = pd.concat([ev.index_frame(tr, "train", classes), ev.index_frame(va, "val", classes)], ignore_index=True)
    return ev.Embeddings(tr["features"], tr["labels"], va["features"], va["labels"], index, probe,
                         {"classes": list(classes), "image_size": 8})


@pytest.fixture()
def crafted_file(tmp_path):
    model, probe, bank, val = toy_setup()
    crafted = craft(model, probe, bank, val, TRANSFER, alpha=2, max_val_patches=12, surrogate="s",
                    classes=["a", "b", "c"], image_size=8, batch_size=5, progress=False)
    path = save_adversarial(tmp_path / "adv" / "s.safetensors", crafted)
    return path, crafted, val


def test_stored_examples_are_lossless_and_in_the_ball(crafted_file):
    path, crafted, val = crafted_file
    with safe_open(str(path), framework="pt") as fh:
        stored = fh.get_tensor("images")
    assert stored.dtype == torch.float32
    assert torch.equal(stored, crafted["images"])
    pos = crafted["positions"].tolist()
    assert len(pos) == 12 and pos == sorted(pos)
    clean = torch.stack([val[i]["image"] for i in pos])
    assert (stored - clean).abs().max() <= 8 / 255 + 1e-6
    assert stored.min() >= 0 and stored.max() <= 1
    assert ((stored * 255) - (stored * 255).round()).abs().max() > 1e-3  # not on the 8-bit grid
    adv = load_adversarial(path)
    assert adv["paths"] == [val[i]["path"] for i in pos]
    assert adv["metadata"]["eps"] == 8 and adv["metadata"]["objective"] == "feature"


def test_crafted_subset_is_the_whitebox_subset_and_spans_every_slide(crafted_file):
    """The surrogate crafts on the white-box sweep's subset (example ids line up), and with 12
    patches for the 12 validation slides every slide and patient is in it."""
    _, crafted, val = crafted_file
    assert crafted["positions"].tolist() == ev.attack_subset(val, {"max_val_patches": 12})
    slides, patients = ev.dataset_groups(val)
    assert set(crafted["slides"]) == set(slides) and set(crafted["patients"]) == set(patients)


def test_target_sees_exactly_the_stored_examples(crafted_file):
    path, crafted, val = crafted_file
    target = Recorder()
    emb = _embeddings(target, ToyPatches(seed=1, tag="t"), val)
    target.seen.clear()
    cfg = toy_cfg()
    cfg["transfer"] = TRANSFER
    df = evaluate_transfer(path, target, emb, cfg, surrogate="s", target="t", batch_size=5)
    assert torch.equal(torch.cat(target.seen), crafted["images"])
    assert list(df.columns) == list(TRANSFER_COLUMNS)
    assert df["level"].tolist() == ["patch", "slide", "patient"]
    # Clean numbers are the target's own on the same patches.
    pos = crafted["positions"]
    clean_scores = ev.knn_predict(emb.val_features[pos], *emb.bank, 3, k=10, temperature=0.07)
    clean = ev.level_metrics(clean_scores, crafted["labels"].numpy(), crafted["patients"], crafted["slides"], 3)
    for r in df.itertuples():
        assert r.clean_acc == pytest.approx(clean[r.level]["acc"])
        assert r.acc_drop == pytest.approx(r.clean_acc - r.acc)
        assert r.mca_drop == pytest.approx(r.clean_mca - r.mca)
    assert df.set_index("level").loc["patch", "acc_drop"] > 20  # transfers between these two toy models


def test_mismatched_validation_set_is_refused(crafted_file):
    path, _, _ = crafted_file
    target = ToyModel()
    other = _embeddings(target, ToyPatches(seed=1, tag="t"), ToyPatches(seed=2, tag="w"))
    with pytest.raises(HSATError, match="same manifest"):
        evaluate_transfer(path, target, other, toy_cfg(), target="t")
    wrong_classes = _embeddings(target, ToyPatches(seed=1, tag="t"), ToyPatches(seed=2, tag="v"), classes=("x", "y", "z"))
    with pytest.raises(HSATError, match="classes"):
        evaluate_transfer(path, target, wrong_classes, toy_cfg(), target="t")


def test_whitebox_vs_transfer_flags_weaker_whitebox():
    wb = pd.DataFrame([
        {"model": "t1", "attack": "pgd", "eps": 8, "steps": 10, "objective": "feature", "classifier": "knn", "level": "patch", "acc": 10.0},
        {"model": "t2", "attack": "pgd", "eps": 8, "steps": 10, "objective": "feature", "classifier": "knn", "level": "patch", "acc": 70.0},
    ])
    tr = pd.DataFrame([
        {"surrogate": "s", "target": "t1", "attack": "pgd", "eps": 8, "steps": 10, "objective": "feature", "classifier": "knn", "level": "patch", "acc": 40.0},
        {"surrogate": "s", "target": "t2", "attack": "pgd", "eps": 8, "steps": 10, "objective": "feature", "classifier": "knn", "level": "patch", "acc": 40.0},
    ])
    out = whitebox_vs_transfer(wb, tr, n_patches=400, z=2.0).set_index("model")
    assert out.loc["t1", "passed"] and not out.loc["t2", "passed"]
    assert set(out["check"]) == {"whitebox_vs_transfer"}


def test_cli_transfer_round_trip(cli_study):  # noqa: F811
    from hsat.cli import main

    root, run, manifest = cli_study
    study = str(root / "study.yaml")
    emb = root / "emb_t" / "m1"
    assert main(["embed", "--run", str(run), "--manifest", str(manifest), "--config", study, "--out", str(emb)]) == 0
    adv = root / "adversarial" / "m1.safetensors"
    assert main(["transfer", "craft", "--run", str(run), "--manifest", str(manifest), "--embeddings", str(emb),
                 "--config", study, "--out", str(adv)]) == 0
    out = root / "transfer" / "m1__m1.csv"
    assert main(["transfer", "evaluate", "--adversarial", str(adv), "--surrogate", "m1", "--target", "m1",
                 "--target-run", str(run), "--target-embeddings", str(emb), "--config", study, "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == list(TRANSFER_COLUMNS) and len(df) == 3
    assert len(load_adversarial(adv)["positions"]) == 14  # evaluation.max_val_patches


def test_cli_transfer_scores_several_surrogates_with_one_load(cli_study, monkeypatch):  # noqa: F811
    import hsat.transfer as transfer_mod
    from hsat.cli import main

    root, run, manifest = cli_study
    study = str(root / "study.yaml")
    emb = root / "emb_t2" / "m1"
    assert main(["embed", "--run", str(run), "--manifest", str(manifest), "--study", study, "--out", str(emb)]) == 0
    adv = root / "adversarial2" / "m1.safetensors"
    assert main(["transfer", "craft", "--run", str(run), "--manifest", str(manifest), "--embeddings", str(emb),
                 "--study", study, "--out", str(adv)]) == 0
    loads = []
    real = transfer_mod.load_trained_model
    monkeypatch.setattr(transfer_mod, "load_trained_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = root / "transfer" / "t.csv"
    common = ["--target", "t", "--target-run", str(run), "--target-embeddings", str(emb), "--study", study]
    assert main(["transfer", "evaluate", "--adversarial", str(adv), str(adv), "--surrogate", "a", "b", *common,
                 "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert len(loads) == 1 and list(df["surrogate"].unique()) == ["a", "b"] and len(df) == 6
    bad = root / "transfer" / "bad.csv"
    assert main(["transfer", "evaluate", "--adversarial", str(adv), "--surrogate", "a", "b", *common, "--out", str(bad)]) == 2
    assert not bad.exists()
