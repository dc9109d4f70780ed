"""Augmentations stay in [0, 1], scale with strength, and the dynamic schedule behaves."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch

from hsat.data.transforms import clean_weight_at, eval_transform, strength_at, train_transform
from hsat.errors import HSATError


def _image(size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g)


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_train_transform_shape_and_range(strength):
    torch.manual_seed(0)
    t = train_transform(16, strength=strength, prob=1.0)
    for size in (12, 16, 24):  # smaller (resized up), equal, larger (cropped)
        for _ in range(20):
            y = t(_image(size))
            assert y.shape == (3, 16, 16)
            assert y.dtype == torch.float32
            assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


def test_eval_transform_deterministic_center_crop():
    x = _image(24)
    t = eval_transform(16)
    y = t(x)
    assert torch.equal(y, t(x))
    assert torch.equal(y, x[:, 4:20, 4:20])
    assert torch.equal(eval_transform(24)(x), x)
    assert eval_transform(32)(x).shape == (3, 32, 32)  # smaller images are resized up


def _mean_view_gap(strength: float, n: int = 40) -> float:
    """Mean |view - image| over many draws, on an image already at the crop size."""
    torch.manual_seed(1)
    x = _image(16)
    t = train_transform(16, strength=strength, prob=0.5)
    gaps = []
    for _ in range(n):
        y = t(x)
        # Undo flips: take the flip of x closest to y, so only non-flip changes count.
        flips = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
        gaps.append(min(float((y - f).abs().mean()) for f in flips))
    return sum(gaps) / len(gaps)


def test_strength_zero_is_near_identity_and_one_is_not():
    weak, strong = _mean_view_gap(0.0), _mean_view_gap(1.0)
    assert weak < 1e-5  # only crop (identity at this size) and flips
    assert strong > 0.02
    assert _mean_view_gap(0.5) < strong


def test_invalid_arguments_raise():
    with pytest.raises(HSATError, match="strength"):
        train_transform(16, strength=1.5)
    with pytest.raises(HSATError, match="prob"):
        train_transform(16, prob=-0.1)
    with pytest.raises(HSATError, match="image_size"):
        eval_transform(0)


def test_strength_schedule_endpoints_and_monotone():
    total = 100
    values = [strength_at(s, total, start=1.0, end=0.0) for s in range(total + 1)]
    assert values[0] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.0)
    assert strength_at(total + 50, total) == pytest.approx(0.0)  # stays at the end value
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[10] > values[90]
    assert strength_at(0, 10, start=0.8, end=0.2) == pytest.approx(0.8)
    assert strength_at(10, 10, start=0.8, end=0.2) == pytest.approx(0.2)
    # Not dynamic: constant start.
    assert {strength_at(s, total, start=0.7, dynamic=False) for s in range(0, total, 7)} == {0.7}


def test_strength_fn_partial_pickles():
    fn = functools.partial(strength_at, total_steps=10, start=1.0, end=0.0, dynamic=True)
    again = pickle.loads(pickle.dumps(fn))
    assert again(5) == pytest.approx(fn(5)) == pytest.approx(0.5)


def test_clean_weight():
    assert clean_weight_at(1.0, lam=2.0, dynamic=True, only_adversarial=False) == pytest.approx(0.0)
    assert clean_weight_at(0.25, lam=2.0, dynamic=True, only_adversarial=False) == pytest.approx(1.5)
    assert clean_weight_at(0.25, lam=2.0, dynamic=False, only_adversarial=False) == pytest.approx(2.0)
    assert clean_weight_at(0.25, lam=2.0, dynamic=True, only_adversarial=True) == 0.0
    assert clean_weight_at(0.25, lam=2.0, dynamic=False, only_adversarial=True) == 0.0
