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


class _PixelFeatures(torch.nn.Module):
    """A fixed 'backbone': a patch's mean intensity per channel, scaled (differentiable, no BN)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * (x.mean(dim=(2, 3)) - 0.5)


def _image_bags(n_slides: int, seed: int, per_slide: int = 6):
    """Slides whose class shows as +-4/255 of mean intensity in channel 0 of every patch."""
    g = torch.Generator().manual_seed(seed)
    xs, sizes, ys = [], [], []
    for s in range(n_slides):
        y = s % 2
        x = 0.5 + 0.01 * torch.randn(per_slide, 3, 8, 8, generator=g)
        x[:, 0] += (4 / 255) * (1 if y else -1)
        xs.append(x.clamp(0, 1))
        sizes.append(per_slide)
        ys.append(y)
    return torch.cat(xs), sizes, torch.tensor(ys)


def _trained_head(backbone, x, sizes, ys):
    feats = backbone.encode(x)
    bags = [(str(i), f, int(y)) for i, (f, y) in enumerate(zip(torch.split(feats, sizes), ys))]
    return train_mil(bags, 2, epochs=20, lr=3e-3, seed=0)


def test_bag_attack_on_the_mil_head_flips_slides_within_the_ball():
    from hsat.evaluate.mil import craft_bags
    from hsat.evaluate.sweep import AttackSpec

    backbone = _PixelFeatures()
    x, sizes, ys = _image_bags(16, 0)
    head = _trained_head(backbone, x, sizes, ys)
    for p in head.parameters():
        p.requires_grad_(False)

    def slide_acc(images):
        with torch.no_grad():
            feats = torch.split(backbone.encode(images), sizes)
            pred = torch.stack([head(f)[0].argmax() for f in feats])
        return float((pred == ys).float().mean())

    assert slide_acc(x) >= 0.9
    clean = backbone.encode(x)
    weak = craft_bags(backbone, head, x, sizes, ys, AttackSpec("pgd", 1.0, 5, "abmil_ce", 0.5), clean,
                      torch.Generator().manual_seed(0))
    strong = craft_bags(backbone, head, x, sizes, ys, AttackSpec("pgd", 12.0, 10, "abmil_ce", 2.0), clean,
                        torch.Generator().manual_seed(0))
    assert float((strong - x).abs().max()) <= 12 / 255 + 1e-6 and 0 <= float(strong.min()) and float(strong.max()) <= 1
    # 12/255 exceeds the 4/255 class signal, so every slide can be pushed across; 1/255 cannot.
    assert slide_acc(strong) <= 0.1 < slide_acc(weak)


def test_a_bags_perturbation_does_not_depend_on_its_chunk():
    from hsat.evaluate.mil import craft_bags
    from hsat.evaluate.sweep import AttackSpec

    backbone = _PixelFeatures()
    x, sizes, ys = _image_bags(4, 1)
    head = _trained_head(backbone, x, sizes, ys)
    spec = AttackSpec("bim", 4.0, 3, "abmil_ce", 1.0)  # no random start: deterministic
    clean = backbone.encode(x)
    together = craft_bags(backbone, head, x, sizes, ys, spec, clean)
    alone = craft_bags(backbone, head, x[:6], sizes[:1], ys[:1], spec, clean[:6])
    assert torch.allclose(together[:6], alone)


def test_bag_chunks_keep_slides_whole():
    from hsat.evaluate.mil import bag_chunks

    slides = ["b"] * 3 + ["a"] * 4 + ["c"] * 5
    chunks = bag_chunks(slides, 8)
    assert [[len(i) for i in c] for c in chunks] == [[4, 3], [5]]
    assert sorted(np.concatenate([np.concatenate(c) for c in chunks]).tolist()) == list(range(12))


def test_mil_head_round_trips_and_a_foreign_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    from hsat.evaluate.mil import load_mil, save_mil

    model = train_mil(_bags(10, 0), 2, epochs=2, seed=0)
    save_mil(tmp_path / "head.safetensors", model, {"model": "m"})
    again = load_mil(tmp_path / "head.safetensors")
    bag = _bags(1, 3)[0][1]
    assert torch.equal(model(bag)[0], again(bag)[0])
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HSATError, match="other.safetensors"):
        load_mil(tmp_path / "other.safetensors")


def test_cli_mil_attacks_the_bags_into_whitebox_rows(cli_study):
    import pandas as pd

    from hsat.cli import main
    from hsat.evaluate import WHITEBOX_COLUMNS

    root, run, manifest = cli_study
    emb = root / "emb" / "m1"
    assert main(["embed", "--run", str(run), "--manifest", str(manifest), "--config", str(root / "study.yaml"),
                 "--out", str(emb)]) == 0
    wb = root / "whitebox_abmil" / "m1.csv"
    assert main(["mil", "--embeddings", str(emb), "--study", str(root / "study.yaml"), "--model", "m1",
                 "--out", str(root / "mil" / "m1.csv"), "--head", str(root / "mil" / "m1.safetensors"),
                 "--run", str(run), "--manifest", str(manifest), "--whitebox", str(wb)]) == 0
    df = pd.read_csv(wb)
    assert list(df.columns) == list(WHITEBOX_COLUMNS)
    assert set(df["classifier"]) == {"abmil"} and set(df["level"]) == {"slide", "patient"}
    assert {"none", "pgd", "worst_case"} <= set(df["attack"])
    for (eps, level), g in df[df["attack"] != "none"].groupby(["eps", "level"]):
        worst = g.loc[g["attack"] == "worst_case", "acc"].iloc[0]
        assert worst <= g.loc[g["attack"] != "worst_case", "acc"].min() + 1e-9
    assert (root / "mil" / "m1.safetensors").exists()
    # --whitebox without the run to attack is a usage error, and nothing is written
    assert main(["mil", "--embeddings", str(emb), "--study", str(root / "study.yaml"), "--model", "m1",
                 "--out", str(root / "mil" / "y.csv"), "--whitebox", str(root / "y_wb.csv")]) == 2
    assert not (root / "mil" / "y.csv").exists() and not (root / "y_wb.csv").exists()


def test_study_check_flags_an_abmil_attack_above_clean_at_slide_level():
    import pandas as pd

    from hsat.evaluate import study_checks

    base = {"model": "m", "method": "hidisc", "group": "", "seed": 0, "steps": 5, "classifier": "abmil",
            "level": "slide", "mca": 0.0, "top2": 0.0, "top3": 0.0, "map": 0.0}
    wb = pd.DataFrame([{**base, "attack": "none", "eps": 0.0, "objective": "none", "acc": 50.0},
                       {**base, "attack": "pgd", "eps": 8.0, "objective": "abmil_ce", "acc": 90.0}])
    out = study_checks(wb, pd.DataFrame(), 400, {}, n_slides=28)
    assert len(out) == 1 and not bool(out["passed"].iloc[0])
    wb.loc[1, "acc"] = 40.0
    assert bool(study_checks(wb, pd.DataFrame(), 400, {}, n_slides=28)["passed"].iloc[0])


class _ConvFeatures(torch.nn.Module):
    """A small convolutional backbone in eval mode (batch norm on running statistics)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                       torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten()).eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * self.net(x)


@pytest.mark.parametrize("backbone_cls", [_PixelFeatures, _ConvFeatures])
@pytest.mark.parametrize("objective", ["abmil_ce", "feature"])
def test_a_bag_through_the_backbone_in_chunks_is_attacked_as_a_whole(objective, backbone_cls):
    """A bag larger than the chunk goes through the backbone a few patches at a time (dL/dfeatures
    first, then each chunk): the same perturbation as the whole-bag attack."""
    from hsat.evaluate.mil import craft_bags
    from hsat.evaluate.sweep import AttackSpec

    backbone = backbone_cls()
    for p in backbone.parameters():
        p.requires_grad_(False)
    x, sizes, ys = _image_bags(3, 2)  # 3 bags of 6 patches
    head = _trained_head(backbone, x, sizes, ys)
    for p in head.parameters():
        p.requires_grad_(False)
    clean = backbone.encode(x).detach()
    calls = []
    encode = backbone.encode
    backbone.encode = lambda xa: (calls.append(len(xa)), encode(xa))[1]
    for spec in (AttackSpec("bim", 4.0, 3, objective, 1.0), AttackSpec("pgd", 8.0, 3, objective, 2.0, 3)):
        whole = craft_bags(backbone, head, x, sizes, ys, spec, clean, torch.Generator().manual_seed(0))
        assert max(calls) == len(x)
        calls.clear()
        chunked = craft_bags(backbone, head, x, sizes, ys, spec, clean, torch.Generator().manual_seed(0), chunk=4)
        assert max(calls) == 4  # never more than a chunk through the backbone
        calls.clear()
        assert not torch.equal(whole, x)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
