"""SupCon and hierarchical losses: formula, grouping, gradients, temperature."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hsat.losses import hierarchical_loss, supcon_loss


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _supcon_by_loops(z: torch.Tensor, t: float, bt: float) -> float:
    """Khosla et al. eq. 2 written out with Python loops over anchors, positives and contrasts."""
    groups, views, _ = z.shape
    items = [(g, v) for g in range(groups) for v in range(views)]
    total = 0.0
    for gi, vi in items:
        anchor = z[gi, vi]
        denom = sum(math.exp(float(anchor @ z[gk, vk]) / t) for gk, vk in items if (gk, vk) != (gi, vi))
        positives = [(gi, vp) for vp in range(views) if vp != vi]
        log_probs = [float(anchor @ z[gp, vp]) / t - math.log(denom) for gp, vp in positives]
        total += -(t / bt) * sum(log_probs) / len(positives)
    return total / len(items)


@pytest.mark.parametrize("shape,t,bt", [((3, 2, 5), 0.07, 0.07), ((4, 3, 8), 0.5, 0.07), ((1, 4, 3), 0.2, 0.1)])
def test_supcon_matches_loop_formula(shape, t, bt):
    z = _unit(*shape, seed=len(shape) + shape[0])
    got = supcon_loss(z, temperature=t, base_temperature=bt)
    assert got.item() == pytest.approx(_supcon_by_loops(z, t, bt), rel=1e-5)


def test_supcon_is_stable_at_tiny_temperature():
    z = _unit(4, 2, 16, seed=3).float()
    loss = supcon_loss(z, temperature=1e-3, base_temperature=1e-3)
    assert torch.isfinite(loss)


def test_supcon_prefers_aligned_groups():
    # Views of a group identical, groups orthogonal: the loss is near its minimum.
    basis = torch.eye(8)[:4]
    aligned = basis[:, None, :].expand(4, 3, 8).contiguous()
    random = _unit(4, 3, 8, seed=1).float()
    assert supcon_loss(aligned) < supcon_loss(random)


def test_temperature_scaling_follows_formula():
    z = _unit(3, 2, 6, seed=4)
    base = supcon_loss(z, temperature=0.1, base_temperature=0.1)
    # Only the t/bt prefactor depends on base_temperature.
    assert supcon_loss(z, temperature=0.1, base_temperature=0.2).item() == pytest.approx(base.item() / 2, rel=1e-10)
    # Scaling embeddings by c is the same as dividing the temperature by c^2 (logits are z.z/t).
    c = 1.5
    scaled = supcon_loss(z * c, temperature=0.1, base_temperature=0.1)
    same = supcon_loss(z, temperature=0.1 / c**2, base_temperature=0.1 / c**2)
    assert scaled.item() == pytest.approx(same.item(), rel=1e-10)


def test_hierarchical_levels_equal_supcon_on_their_grouping():
    p, s, k, v, d = 3, 2, 2, 2, 7
    z = _unit(p, s, k, v, d, seed=5)
    out = hierarchical_loss(z, temperature=0.1, base_temperature=0.07)
    assert set(out) == {"patient", "slide", "patch", "total"}
    # Build the groups by explicit indexing rather than reshape.
    patient = torch.stack([torch.stack([z[i, a, b, c] for a in range(s) for b in range(k) for c in range(v)]) for i in range(p)])
    slide = torch.stack([torch.stack([z[i, a, b, c] for b in range(k) for c in range(v)]) for i in range(p) for a in range(s)])
    patch = torch.stack([z[i, a, b] for i in range(p) for a in range(s) for b in range(k)])
    for name, grouped in (("patient", patient), ("slide", slide), ("patch", patch)):
        expected = supcon_loss(grouped, temperature=0.1, base_temperature=0.07)
        torch.testing.assert_close(out[name], expected)
    torch.testing.assert_close(out["total"], out["patient"] + out["slide"] + out["patch"])
    # The levels really differ (a wrong grouping would often coincide).
    assert len({round(out[n].item(), 6) for n in ("patient", "slide", "patch")}) == 3


def test_hierarchical_subset_and_weights():
    z = _unit(2, 2, 3, 2, 4, seed=6)
    full = hierarchical_loss(z)
    out = hierarchical_loss(z, levels=("patch", "slide"), weights={"patch": 2.0, "slide": 0.5, "patient": 9.0})
    assert set(out) == {"patch", "slide", "total"}
    torch.testing.assert_close(out["total"], 2.0 * full["patch"] + 0.5 * full["slide"])


@pytest.mark.parametrize(
    "shape,kw,match",
    [
        ((2, 2, 2, 2), {}, "shape"),
        ((2, 2, 2, 2, 4), {"levels": ("tissue",)}, "levels"),
        ((2, 2, 2, 2, 4), {"levels": ()}, "levels"),
        ((2, 2, 2, 2, 4), {"weights": {"cell": 1.0}}, "unknown levels"),
        ((2, 2, 2, 1, 4), {"levels": ("patch",)}, "patch level"),
    ],
)
def test_hierarchical_rejects_bad_input(shape, kw, match):
    with pytest.raises(ValueError, match=match):
        hierarchical_loss(_unit(*shape), **kw)


def test_supcon_rejects_single_view():
    with pytest.raises(ValueError, match="at least 2"):
        supcon_loss(_unit(3, 1, 4))


def test_gradient_steps_lower_the_loss():
    torch.manual_seed(0)
    raw = torch.randn(3, 2, 2, 2, 16, requires_grad=True)
    opt = torch.optim.SGD([raw], lr=0.5)

    def loss() -> torch.Tensor:
        return hierarchical_loss(F.normalize(raw, dim=-1), temperature=0.2)["total"]

    start = loss().item()
    for _ in range(20):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert loss().item() < start - 0.1


def _dino_loss_loop(student, teacher, center, ts, tt):
    """The reference training loop's formula, written as its two loops."""
    import torch.nn.functional as F

    total, n = 0.0, 0
    q = F.softmax((teacher - center) / tt, dim=-1)
    for iq in range(teacher.shape[0]):
        for v in range(student.shape[0]):
            if v == iq:
                continue
            total = total + torch.sum(-q[iq] * F.log_softmax(student[v] / ts, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_dino_loss_matches_the_two_loops_and_skips_same_crop_pairs():
    from hsat.losses import dino_loss

    torch.manual_seed(0)
    student = torch.randn(6, 5, 11, requires_grad=True)  # 2 global + 4 local crops
    teacher = torch.randn(2, 5, 11)
    center = torch.randn(11) * 0.1
    got = dino_loss(student, teacher, center, 0.1, 0.04)
    assert torch.allclose(got, _dino_loss_loop(student, teacher, center, 0.1, 0.04), atol=1e-6)
    got.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    # Only global crops: the two cross pairs (0, 1) and (1, 0) count, not (0, 0) or (1, 1).
    two = dino_loss(teacher.clone(), teacher, torch.zeros(11), 0.1, 0.04)
    assert torch.allclose(two, _dino_loss_loop(teacher, teacher, torch.zeros(11), 0.1, 0.04), atol=1e-6)
    # The teacher gets no gradient, and shapes are checked.
    t = teacher.clone().requires_grad_(True)
    dino_loss(student.detach().requires_grad_(True), t, center).backward()
    assert t.grad is None
    with pytest.raises(ValueError):
        dino_loss(torch.randn(1, 5, 11), torch.randn(2, 5, 11), center)
    with pytest.raises(ValueError):
        dino_loss(torch.randn(4, 5, 11), torch.randn(2, 4, 11), center)


def test_dino_loss_center_and_temperatures_act_as_defined():
    from hsat.losses import dino_loss

    torch.manual_seed(1)
    student, teacher = torch.randn(4, 3, 7), torch.randn(2, 3, 7)
    # A constant center shifts every teacher logit equally: the targets, hence the loss, do not change.
    assert torch.allclose(dino_loss(student, teacher, torch.full((7,), 3.0)), dino_loss(student, teacher, torch.zeros(7)), atol=1e-6)
    # A sharper teacher (lower temperature) concentrates the targets on the teacher's argmax class.
    sharp = dino_loss(student, teacher, torch.zeros(7), teacher_temp=0.001)
    lp = torch.log_softmax(student / 0.1, dim=-1)
    onehot = torch.nn.functional.one_hot(teacher.argmax(-1), 7).float()
    expected = torch.stack([-(onehot[t] * lp[s]).sum(-1).mean() for t in range(2) for s in range(4) if s != t]).mean()
    assert torch.allclose(sharp, expected, atol=1e-4)
