"""Methods are registry entries and objectives; "robust X" wraps any objective's own loss."""

from __future__ import annotations

import torch

from hsat.losses import hierarchical_loss
from hsat.methods import METHODS, VARIANTS, Robust, build_objective, method_label, methods_with_role, resolve_method
from hsat.methods.base import Objective
from hsat.methods.hidisc import HiDisc
from hsat.models import build_model
from hsat.train import embed_views, hsat_step

torch.set_num_threads(1)
ATTACK = {"eps": 8, "alpha": 2, "steps": 3, "random_start": True, "bn_mode": "eval", "only_adversarial": True,
          "forward": "separate"}


def test_one_entry_holds_name_label_role_and_levels():
    assert set(METHODS) == set(VARIANTS)
    assert method_label("hsat_patch") == "HSAT-Patch" and method_label("mine") == "mine"
    assert methods_with_role("baseline") == ("hidisc",)
    for name in methods_with_role("level", "lmax", "method"):
        assert VARIANTS[name]["adversarial"]
    assert isinstance(build_objective(resolve_method({"name": "hsat"})), Robust)
    assert type(build_objective(resolve_method({"name": "hidisc"}))) is HiDisc


class PatchOnly(Objective):
    """A made-up method: its loss is not HiDisc's, so the wrapper must follow it."""

    def loss(self, z):
        out = hierarchical_loss(z, ["patch"])
        return {"patch": out["patch"], "total": out["total"]}


def test_robust_wraps_any_objective_and_maximises_its_own_loss():
    torch.manual_seed(0)
    model = build_model("test_resnet", head_hidden=(16,), embed_dim=8).eval()
    shape = (2, 2, 2, 2)
    x = torch.rand(16, 3, 16, 16)
    method = resolve_method({"name": "mine", "adversarial": True, "min_levels": ["patch"], "max_levels": ["patch"]})
    inner = PatchOnly(method)
    robust = Robust(inner)
    x_adv = robust.adversarial_views(model, x, shape, attack=ATTACK, eps=8, embed=embed_views,
                                     generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = inner.attack_loss(embed_views(model, x, shape)[0])
        after = inner.attack_loss(embed_views(model, x_adv, shape)[0])
    assert after > before
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert all(p.requires_grad for p in model.parameters())  # the attack restored them
    clean, adv = robust.training_views(model, x, shape, attack=ATTACK, eps=8, embed=embed_views)
    assert clean is None and adv is not None  # only adversarial views
    clean, adv = robust.training_views(model, x, shape, attack={**ATTACK, "only_adversarial": False}, eps=8,
                                       embed=embed_views)
    assert clean is x and adv is not None


def test_hsat_step_asks_the_objective_and_calls_after_step(monkeypatch):
    import hsat.train as train_mod

    calls = []

    class Counting(HiDisc):
        def after_step(self, model):
            calls.append(model)

    monkeypatch.setattr(train_mod, "build_objective", lambda method: Robust(Counting(method)))
    torch.manual_seed(0)
    model = build_model("test_resnet", head_hidden=(16,), embed_dim=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.rand(2, 2, 2, 2, 3, 16, 16)
    result = hsat_step(model, opt, images, method=resolve_method({"name": "hsat"}), attack=ATTACK, eps=8,
                       generator=torch.Generator().manual_seed(0))
    assert calls == [model] and set(result.losses) == {f"loss_adv_{lvl}" for lvl in ("patient", "slide", "patch")}
