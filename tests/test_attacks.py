"""PGD / BIM / MI-FGSM: constraints, input-only gradients, determinism, agreement with torchattacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hsat.attacks import ATTACKS, attack_mode, bim, frozen, mifgsm, pgd

EPS, ALPHA = 8 / 255, 2 / 255


def _classifier(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 2)]
    return nn.Sequential(*layers)


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes that differ by +-0.03 along a fixed +-1 pixel pattern (< eps = 8/255 ~ 0.031)."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 2, (3, 8, 8), generator=torch.Generator().manual_seed(123)).float() * 2 - 1
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 + (2 * y - 1).float().view(-1, 1, 1, 1) * 0.03 * pattern + 0.005 * torch.randn(n, 3, 8, 8, generator=g)
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small non-robust linear classifier, trained for a few steps to ~100% clean accuracy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    x, y = _separable(256, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    xv, yv = _separable(128, seed=1)
    return model, xv, yv


def _ce(model: nn.Module, y: torch.Tensor):
    return lambda x: F.cross_entropy(model(x), y, reduction="sum")


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", ["pgd", "bim", "mifgsm"])
def test_stays_in_ball_and_range_and_raises_objective(name):
    model = _classifier().eval()
    # Hierarchical shape (P, S, K, V, C, H, W), with pixels at 0 and 1 to exercise the range clamp.
    x = torch.rand(2, 2, 1, 2, 3, 8, 8)
    x[0, 0, 0, 0, :, :2] = 0.0
    x[1, 1, 0, 1, :, :2] = 1.0
    y = torch.randint(0, 2, (8,))

    def objective(xa: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xa.reshape(-1, 3, 8, 8)), y, reduction="sum")

    x_adv = ATTACKS[name](x, objective, EPS, ALPHA, 5, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > EPS / 2  # it moved
    with torch.no_grad():
        assert objective(x_adv) > objective(x)


@pytest.mark.parametrize("name", ["pgd", "bim", "mifgsm"])
def test_no_parameter_gradients_and_flags_restored(name):
    model = _classifier(bn=True).train()
    model[0].bias.requires_grad_(False)  # a mixed pattern of flags must come back unchanged
    flags = [p.requires_grad for p in model.parameters()]
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    seen: list[tuple[bool, bool]] = []

    def objective(xa):
        seen.append((model.training, any(p.requires_grad for p in model.parameters())))
        return F.cross_entropy(model(xa), y, reduction="sum")

    with frozen(model), attack_mode(model, "eval"):
        ATTACKS[name](x, objective, EPS, ALPHA, 3)
    assert seen and all(s == (False, False) for s in seen)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.training and model[1].training
    # Even without frozen(): only the input gradient is taken, so no .grad appears.
    ATTACKS[name](x, _ce(model.eval(), y), EPS, ALPHA, 2)
    assert all(p.grad is None for p in model.parameters())


def test_attack_mode_controls_batch_norm():
    model = _classifier(bn=True)
    bn = model[1]
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    before = bn.running_mean.clone()
    with attack_mode(model, "eval"):
        pgd(x, _ce(model, y), EPS, ALPHA, 3)
    torch.testing.assert_close(bn.running_mean, before)  # eval: statistics untouched
    assert model.training
    model.eval()
    with attack_mode(model, "train"):
        assert bn.training
        pgd(x, _ce(model, y), EPS, ALPHA, 3)
    assert not model.training and not bn.training
    assert not torch.allclose(bn.running_mean, before)  # train: batch statistics, updated
    with pytest.raises(ValueError, match="bn_mode"):
        with attack_mode(model, "frozen"):
            pass


def test_random_start_is_deterministic_with_generator():
    model = _classifier().eval()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    obj = _ce(model, y)
    a = pgd(x, obj, EPS, ALPHA, 2, generator=torch.Generator().manual_seed(7))
    b = pgd(x, obj, EPS, ALPHA, 2, generator=torch.Generator().manual_seed(7))
    c = pgd(x, obj, EPS, ALPHA, 2, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # The random start lies inside the ball: one zero-size step leaves only the start.
    start = pgd(x, lambda xa: xa.sum() * 0, EPS, 1e-12, 1, generator=torch.Generator().manual_seed(7))
    assert 0 < (start - x).abs().max() <= EPS + 1e-6


def test_bim_has_no_random_start():
    model = _classifier().eval()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    obj = _ce(model, y)
    torch.manual_seed(0)
    a = bim(x, obj, EPS, ALPHA, 3)
    torch.manual_seed(1)
    b = bim(x, obj, EPS, ALPHA, 3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, pgd(x, obj, EPS, ALPHA, 3, random_start=False), rtol=0, atol=0)
    # One step is exactly FGSM from the clean image.
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(obj(xg), xg)
    fgsm = (x + ALPHA * grad.sign()).clamp(0, 1)
    torch.testing.assert_close(bim(x, obj, EPS, ALPHA, 1), fgsm)


def test_mifgsm_momentum():
    model = _classifier().eval()
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1] * 3)
    obj = _ce(model, y)
    plain = bim(x, obj, 16 / 255, ALPHA, 10)
    # decay 0 is BIM (the normalisation is positive, so the sign is unchanged).
    torch.testing.assert_close(mifgsm(x, obj, 16 / 255, ALPHA, 10, decay=0.0), plain, rtol=0, atol=1e-7)
    assert not torch.equal(mifgsm(x, obj, 16 / 255, ALPHA, 10, decay=1.0), plain)


def test_mifgsm_normalises_each_example_separately():
    model = _classifier().eval()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    x[0] *= 0.2  # examples with very different gradient scales
    together = mifgsm(x, _ce(model, y), EPS, ALPHA, 6)
    alone = torch.cat([mifgsm(x[i : i + 1], _ce(model, y[i : i + 1]), EPS, ALPHA, 6) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["pgd", "bim", "mifgsm"])
def test_trivial_cases_and_bad_arguments(name):
    attack = ATTACKS[name]
    x = torch.rand(2, 3, 4, 4)
    obj = lambda xa: xa.sum()  # noqa: E731
    for out in (attack(x, obj, 0.0, ALPHA, 5), attack(x, obj, EPS, ALPHA, 0)):
        torch.testing.assert_close(out, x, rtol=0, atol=0)
        assert out.data_ptr() != x.data_ptr()
    with pytest.raises(ValueError, match="8/255"):
        attack(x, obj, 8, 2, 5)
    with pytest.raises(ValueError, match="scalar"):
        attack(x, lambda xa: xa.sum(dim=0), EPS, ALPHA, 1)
    with pytest.raises(TypeError, match="unexpected"):
        attack(x, obj, EPS, ALPHA, 1, restarts=3)


@pytest.mark.parametrize("name", ["pgd", "bim", "mifgsm"])
def test_attacks_lower_accuracy_of_non_robust_model(trained, name):
    model, x, y = trained
    clean = _accuracy(model, x, y)
    assert clean > 0.95
    with frozen(model):
        x_adv = ATTACKS[name](x, _ce(model, y), EPS, ALPHA, 10, generator=torch.Generator().manual_seed(0))
    assert _accuracy(model, x_adv, y) < clean - 0.5


def test_uniform_noise_hurts_far_less_than_the_attack(trained):
    model, x, y = trained
    g = torch.Generator().manual_seed(0)
    noisy = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * EPS).clamp(0, 1)
    adv = pgd(x, _ce(model, y), EPS, ALPHA, 10, generator=g)
    assert _accuracy(model, noisy, y) > _accuracy(model, adv, y) + 0.5


# --- agreement with an independent, well-kept implementation --------------------------------


def _ce_mean(model, y):
    # torchattacks maximises the batch-mean cross-entropy; sign() makes the scale immaterial.
    return lambda x: F.cross_entropy(model(x), y)


def test_pgd_equals_torchattacks_pgd_without_random_start():
    torchattacks = pytest.importorskip("torchattacks")
    model = _classifier(seed=3).eval()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 2, (8,))
    ours = pgd(x, _ce_mean(model, y), EPS, ALPHA, 10, random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=10, random_start=False)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert (ours - x).abs().max() > EPS / 2


def test_bim_equals_torchattacks_bim():
    torchattacks = pytest.importorskip("torchattacks")
    model = _classifier(seed=4).eval()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 2, (8,))
    ours = bim(x, _ce_mean(model, y), EPS, ALPHA, 10)
    theirs = torchattacks.BIM(model, eps=EPS, alpha=ALPHA, steps=10)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_mifgsm_equals_torchattacks_mifgsm():
    torchattacks = pytest.importorskip("torchattacks")
    model = _classifier(seed=5).eval()
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 2, (8,))
    ours = mifgsm(x, _ce_mean(model, y), EPS, ALPHA, 10, decay=1.0)
    theirs = torchattacks.MIFGSM(model, eps=EPS, alpha=ALPHA, steps=10, decay=1.0)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
