"""Attack sanity checks: an honest attack passes every one; each check fails on a broken attack.

Three broken attacks stand in for the ways evaluations go wrong: one that returns x unchanged,
one whose gradient is masked by a non-differentiable step in the model (so PGD is left with its
random start), and one whose sign is flipped (it minimises the objective). They run on a hard
toy problem (overlapping classes, clean accuracy well below 100 %, 2 x 2 px images so that
noise and small perturbations matter), through the real sweep: only `hsat.attacks.ATTACKS` is
swapped.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_evaluate import ToyModel, ToyPatches, toy_cfg, toy_setup

import hsat.attacks as attacks_mod
import hsat.evaluate as ev
from hsat.evaluate import SANITY_COLUMNS, sanity_checks, study_checks
from hsat.evaluate.sanity import check_whitebox_vs_transfer
from hsat.transfer import craft, evaluate_transfer, save_adversarial

torch.set_num_threads(1)


class Quantised(ToyModel):
    """The toy model behind a non-differentiable step (rounding to 1/255): zero input gradient."""

    def encode(self, x):
        self.calls += 1
        return self.proj((torch.round(x * 255) / 255).mean((2, 3)) - 0.5)


def hard_setup(model=None):
    """Overlapping classes (offset 0.03 against pixel noise 0.06 on 2 x 2 px): clean acc ~70-90 %."""
    model = model or ToyModel()

    class Hard(ToyPatches):
        def __init__(self, seed, tag):
            g = torch.Generator().manual_seed(seed)
            self.items = []
            for p in range(30):
                label = p % 3
                for s in range(2):
                    for k in range(5):
                        img = 0.5 + 0.06 * torch.randn(3, 2, 2, generator=g)
                        img[label] += 0.03
                        self.items.append((img.clamp(0, 1), label, f"{tag}P{p}", f"{tag}P{p}-S{s}", f"/{tag}/P{p}/S{s}/{k}.png"))
            self.labels = np.array([it[1] for it in self.items])

    train = Hard(1, "t")
    emb = ev.embed(ToyModel(), train, batch_size=64, progress=False)
    probe = ev.fit_linear_probe(emb["features"], emb["labels"], 3, epochs=200, lr=0.05, weight_decay=0.0)
    return model, probe, (emb["features"], emb["labels"]), Hard(2, "v")


def hard_cfg(eps: float = 8):
    cfg = toy_cfg(eps=[eps], steps=6)
    cfg["batch_size"] = 128
    cfg["sanity"] = {"steps": [1, 3, 6], "eps": [2, 8, 32], "restarts": 3, "large_eps": 64}
    return cfg


def identity(x, objective, eps, alpha, steps, random_start=True, generator=None, **kw):
    return x.detach().clone()


def creeping(x, objective, eps, alpha, steps, random_start=True, generator=None, **kw):
    """PGD with a tenth of its step: honest in direction, far from converged at the sweep's steps."""
    return attacks_mod.pgd(x, objective, eps, alpha / 10, steps, random_start=False, generator=generator)


def sign_flipped(x, objective, eps, alpha, steps, random_start=True, generator=None, **kw):
    return attacks_mod.pgd(x, lambda z: -objective(z), eps, alpha, steps, random_start=random_start, generator=generator)


@pytest.fixture()
def broken(monkeypatch):
    """broken(fn): every iterative attack of the sweep becomes `fn`."""

    def install(fn):
        for name in ("pgd", "bim", "mifgsm"):
            monkeypatch.setitem(attacks_mod.ATTACKS, name, fn)

    return install


def _failed(df: pd.DataFrame, check: str) -> bool:
    rows = df[df["check"] == check]
    assert len(rows), f"no {check} rows"
    return not rows["passed"].all()


# ----------------------------------------------------------------------------- honest attacks pass


def test_sanity_checks_pass_for_an_honest_attack():
    model, probe, bank, val = toy_setup()
    cfg = toy_cfg()
    cfg["sanity"] = {"steps": [1, 3, 6], "eps": [2, 8, 64], "restarts": 3}
    df = sanity_checks(model, probe, bank, val, cfg, model_name="toy", progress=False)
    assert list(df.columns) == list(SANITY_COLUMNS)
    assert {"steps", "steps_feature_knn", "converged", "restarts", "eps", "large_eps_label", "large_eps_feature",
            "noise"} == set(df["check"])
    assert df["passed"].map(type).eq(bool).all()
    assert df["passed"].all(), df[~df["passed"]]
    assert df[df.check == "steps"]["value"].tolist() == [1, 3, 6]
    restarts = df[df.check == "restarts"]
    assert restarts["param"].tolist() == ["restart"] * 3 + ["worst_of"]


def test_hard_problem_passes_with_honest_attacks():
    model, probe, bank, val = hard_setup()
    df = sanity_checks(model, probe, bank, val, hard_cfg(), model_name="hard", progress=False)
    assert df["passed"].all(), df[~df["passed"]]
    wb = ev.whitebox_sweep(model, probe, bank, val, hard_cfg(), model_name="hard", progress=False)
    clean = wb[(wb.attack == "none") & (wb.level == "patch")]["acc"]
    assert (clean < 95).all() and (clean > 50).all()  # a problem where accuracy can rise
    assert study_checks(wb, pd.DataFrame(), len(val), hard_cfg())["passed"].all()


# ----------------------------------------------------------------------------- each check fails on a broken attack


def test_identity_attack_fails_the_large_eps_checks(broken):
    broken(identity)
    model, probe, bank, val = hard_setup()
    df = sanity_checks(model, probe, bank, val, hard_cfg(), model_name="hard", progress=False)
    assert _failed(df, "large_eps_label") and _failed(df, "large_eps_feature")


def test_identity_attack_fails_the_noise_check(broken):
    broken(identity)
    model, probe, bank, val = hard_setup()
    df = sanity_checks(model, probe, bank, val, hard_cfg(), model_name="hard", progress=False)
    assert _failed(df, "noise")


def test_unconverged_attack_fails_the_converged_check(broken):
    """Steps too small to cross the ball: doubling them keeps finding adversarial examples."""
    broken(creeping)
    model, probe, bank, val = hard_setup()
    df = sanity_checks(model, probe, bank, val, hard_cfg(), model_name="hard", progress=False)
    conv = df[df.check == "converged"]
    assert set(conv["objective"]) == {"linear_ce", "knn_soft"} and set(conv["steps"]) == {12}
    assert _failed(df, "converged")


def test_sign_flipped_attack_fails_steps_eps_and_above_clean(broken):
    """A flipped attack repairs misclassified patches: accuracy rises with steps, with eps, above clean."""
    broken(sign_flipped)
    model, probe, bank, val = hard_setup()
    df = sanity_checks(model, probe, bank, val, hard_cfg(), model_name="hard", progress=False)
    assert _failed(df, "steps")
    assert _failed(df, "eps")
    wb = ev.whitebox_sweep(model, probe, bank, val, hard_cfg(), model_name="hard", progress=False)
    assert _failed(study_checks(wb, pd.DataFrame(), len(val), hard_cfg()), "above_clean")


def test_sign_flipped_feature_attack_fails_the_feature_steps_check(broken):
    """On 2 px patches a 32/255 random start hurts kNN; a flipped attack climbs back with steps."""
    broken(sign_flipped)
    model = ToyModel()
    train = ToyPatches(n_patients=30, patches=5, seed=1, size=2, tag="t")
    emb = ev.embed(model, train, batch_size=64, progress=False)
    probe = ev.fit_linear_probe(emb["features"], emb["labels"], 3, epochs=200, lr=0.05, weight_decay=0.0)
    val = ToyPatches(n_patients=30, patches=5, seed=2, size=2, tag="v")
    cfg = hard_cfg(eps=32)
    cfg["whitebox"]["alpha"] = 8
    df = sanity_checks(model, probe, (emb["features"], emb["labels"]), val, cfg, model_name="small", progress=False)
    assert _failed(df, "steps_feature_knn")


def test_masked_gradient_fails_the_restarts_check():
    model, probe, bank, val = hard_setup(Quantised())
    df = sanity_checks(model, probe, bank, val, hard_cfg(), model_name="masked", progress=False)
    assert _failed(df, "restarts")
    assert _failed(df, "large_eps_label")


def test_identity_whitebox_attack_fails_whitebox_vs_transfer(broken, tmp_path):
    model, probe, bank, val = hard_setup()
    cfg = hard_cfg()
    adv = craft(model, probe, bank, val, {"attack": "pgd", "eps": 8, "steps": 6, "objective": "linear_ce", "classifier": "linear"},
                alpha=2, surrogate="s", image_size=2, progress=False)
    path = save_adversarial(tmp_path / "s.safetensors", adv)
    va = ev.embed(model, val, batch_size=64, progress=False)
    index = pd.concat([ev.index_frame(va, "train", ["a", "b", "c"]), ev.index_frame(va, "val", ["a", "b", "c"])], ignore_index=True)
    emb = ev.Embeddings(bank[0], bank[1], va["features"], va["labels"], index, probe, {"image_size": 2})
    transfer = evaluate_transfer(path, model, emb, {**cfg, "transfer": {"classifier": "linear"}}, surrogate="s", target="t")
    honest = ev.whitebox_sweep(model, probe, bank, val, cfg, model_name="t", progress=False)
    assert not _failed(check_whitebox_vs_transfer(honest, transfer, len(val), 2.0), "whitebox_vs_transfer")
    broken(identity)
    weak = ev.whitebox_sweep(model, probe, bank, val, cfg, model_name="t", progress=False)
    assert _failed(check_whitebox_vs_transfer(weak, transfer, len(val), 2.0), "whitebox_vs_transfer")


def test_monotone_tolerance_is_the_noise_of_a_difference_of_two_estimates():
    """2 -> 5 of 210 patches is noise (both accuracies are estimates); 2 -> 14 is a rise."""
    from hsat.evaluate.sanity import check_monotone
    from hsat.evaluate.sweep import AttackSpec

    def run(accs):
        pts = [(AttackSpec("pgd", e, 5, "linear_ce"), a) for e, a in zip((8.0, 32.0, 64.0), accs)]
        return [r["passed"] for r in check_monotone("m", "eps", "eps", pts, 210, 2.0, "linear")]

    n = 210
    assert run([30.0, 100 * 2 / n, 100 * 5 / n]) == [True, True, True]
    assert run([30.0, 100 * 2 / n, 100 * 14 / n]) == [True, True, False]
    assert run([30.0, 45.0, 1.0]) == [True, False, True]  # a rise is judged against the lowest before


def test_the_first_point_of_a_sweep_is_checked_against_clean():
    """With clean accuracy as `start`, the first point is a check that can fail (an attack that raises
    accuracy above clean); without it, it is only the reference of the next point."""
    from hsat.evaluate.sanity import check_monotone
    from hsat.evaluate.sweep import AttackSpec

    pts = [(AttackSpec("pgd", e, 5, "linear_ce"), a) for e, a in zip((8.0, 32.0), (45.0, 10.0))]
    rows = check_monotone("m", "eps", "eps", pts, 210, 2.0, "linear", start=30.0)
    assert [r["passed"] for r in rows] == [False, True] and "clean acc (30.00)" in rows[0]["criterion"]
    assert [r["passed"] for r in check_monotone("m", "eps", "eps", pts, 210, 2.0, "linear", start=45.0)] == [True, True]
    assert [r["passed"] for r in check_monotone("m", "eps", "eps", pts, 210, 2.0, "linear")] == [True, True]


def test_above_clean_leaves_out_worst_case_rows():
    """A worst case counts an example only when clean is correct too, so it can never exceed clean:
    no above_clean row for it (patch level, and the ABMIL rows at slide level)."""
    rows = []
    for clf, level in (("knn", "patch"), ("linear", "patch"), ("abmil", "slide")):
        for attack, acc in (("none", 50.0), ("pgd", 40.0), ("worst_case", 30.0)):
            rows.append(dict(model="m", classifier=clf, level=level, attack=attack, eps=0.0 if attack == "none" else 8.0,
                             steps=0 if attack == "none" else 5, objective="none" if attack == "none" else "feature", acc=acc))
    wb = pd.DataFrame(rows)
    df = study_checks(wb, pd.DataFrame(), 210, hard_cfg(), n_slides=70)
    assert set(df["check"]) == {"above_clean"} and len(df) == 3  # the pgd rows of knn, linear and abmil
    assert not df["attack"].eq("worst_case").any() and df["passed"].all()
    wb.loc[wb["attack"] == "pgd", "acc"] = 80.0  # an attack above clean still fails
    assert not study_checks(wb, pd.DataFrame(), 210, hard_cfg(), n_slides=70)["passed"].any()
