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


# ----------------------------------------------------------------------------- streamed to and from disk


def test_streamed_file_has_safetensors_own_bytes(tmp_path):
    """The writer's layout is safetensors' (so any reader, lazy slicing included, reads it): the
    same tensors and metadata written in three batches give save_file's bytes exactly."""
    from safetensors.torch import save_file

    from hsat.transfer import METADATA_KEY, AdversarialWriter

    g = torch.Generator().manual_seed(0)
    images = torch.rand(7, 3, 5, 5, generator=g)
    crafted = {"images": images, "labels": torch.tensor([0, 2, 1, 1, 0, 2, 2]), "positions": torch.arange(7) * 3,
               "paths": [f"/v/P{i}/é{i}.tif" for i in range(7)], "patients": list("aabbccd"), "slides": list("abcdefg"),
               "metadata": {"format": "hsat-adversarial-v1", "eps": 8.0, "surrogate": "s"}}
    with AdversarialWriter(tmp_path / "w.safetensors") as writer:
        for part in images.split(3):
            writer.write(part)
        path = writer.finish(crafted)
    meta = dict(crafted["metadata"], paths=crafted["paths"], patients=crafted["patients"], slides=crafted["slides"])
    import json

    save_file({"images": images, "labels": crafted["labels"], "positions": crafted["positions"]},
              str(tmp_path / "ref.safetensors"), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    assert path.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors", "w.safetensors"]  # no scratch left


def test_an_interrupted_craft_leaves_nothing(tmp_path):
    from hsat.transfer import AdversarialWriter

    with pytest.raises(RuntimeError), AdversarialWriter(tmp_path / "adv" / "s.safetensors") as writer:
        writer.write(torch.rand(2, 3, 4, 4))
        raise RuntimeError("killed")
    assert list((tmp_path / "adv").iterdir()) == []


def test_scores_read_from_disk_equal_scores_in_memory(crafted_file):
    """Scoring streams the stored file batch by batch; the numbers equal the target's own scores of the
    in-memory crafted images, whatever the batch size."""
    path, crafted, val = crafted_file
    target = ToyModel()
    emb = _embeddings(target, ToyPatches(seed=1, tag="t"), val)
    cfg = toy_cfg()
    cfg["transfer"] = TRANSFER
    frames = [evaluate_transfer(path, target, emb, cfg, surrogate="s", target="t", batch_size=bs) for bs in (1, 5, 64)]
    with torch.no_grad():
        mem = ev.knn_predict(target.encode(crafted["images"]), *emb.bank, 3, k=10, temperature=0.07)
    acc = ev.level_metrics(mem, crafted["labels"].numpy(), crafted["patients"], crafted["slides"], 3)
    for df in frames:
        pd.testing.assert_frame_equal(df, frames[0])
        for r in df.itertuples():
            assert r.acc == pytest.approx(acc[r.level]["acc"])


_MEMORY_SCRIPT = r"""
import resource, sys, torch
sys.path.insert(0, sys.argv[3])
from test_evaluate import ToyModel, toy_setup
from torch.utils.data import Dataset
from hsat.transfer import AdversarialWriter, craft, evaluate_transfer
import hsat.evaluate as ev
torch.set_num_threads(1)

class Lazy(Dataset):
    # 128 px patches made on demand: the dataset itself holds nothing.
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        img = (0.5 + 0.01 * torch.randn(3, 128, 128, generator=g)).clamp(0, 1)
        return {"image": img, "label": i % 3, "patient": f"P{i // 8}", "slide": f"P{i // 8}-S{i // 4}", "path": f"/v/{i}.tif"}

n, out = int(sys.argv[1]), sys.argv[2]
model, probe, bank, _ = toy_setup()
with AdversarialWriter(out) as w:
    crafted = craft(model, probe, bank, Lazy(n), {"attack": "pgd", "eps": 8, "steps": 2, "objective": "feature",
                    "classifier": "knn"}, alpha=2, classes=["a", "b", "c"], image_size=128, batch_size=32,
                    progress=False, sink=w.write)
    w.finish(crafted)
craft_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
feats = torch.randn(n, 3)
emb = ev.Embeddings(bank[0], bank[1], feats, crafted["labels"], None, probe, {"classes": ["a", "b", "c"]})
"""


def _peak_kib(n: int, tmp_path) -> int:
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "memory.py"
    script.write_text(_MEMORY_SCRIPT + "print(craft_peak)\n")
    # glibc's fixed mmap threshold: freed batches go back to the system, so the peak measures live data
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script), str(n), str(tmp_path / f"adv{n}.safetensors"),
                          str(Path(__file__).parent)], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.split()[-1])


def test_crafting_memory_stays_flat_when_the_validation_set_grows(tmp_path):
    """Crafting 4x the patches (128 px: 36 MB more images than the small set) raises the peak
    resident memory by less than a quarter of that: the images go to disk batch by batch. Held in
    memory and concatenated, as before, they would add about twice the 36 MB."""
    small, large = _peak_kib(64, tmp_path), _peak_kib(256, tmp_path)
    images_kib = (256 - 64) * 3 * 128 * 128 * 4 // 1024
    assert large - small < images_kib // 4, (small, large, images_kib)
    with safe_open(str(tmp_path / "adv256.safetensors"), framework="pt") as fh:
        assert fh.get_slice("images").get_shape() == [256, 3, 128, 128]
