"""Augmentations stay in [0, 1], scale with strength, and the dynamic schedule behaves; data.resize
and the size check act before the crop; the `he` preset jitters stains in HED space; `srh` is
the recipe it always was."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest
import torch
from skimage import color, data
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from hsat.config import validate
from hsat.data.transforms import (
    HED_SCALE,
    HED_SHIFT,
    HEDJitter,
    PatchTooSmall,
    clean_weight_at,
    loss_weights,
    eval_transform,
    resize_op,
    strength_at,
    train_transform,
)
from hsat.errors import HSATError


def _image(size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g)


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_train_transform_shape_and_range(strength):
    torch.manual_seed(0)
    t = train_transform(16, strength=strength, prob=1.0, allow_upscale=True)
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
    assert eval_transform(32, allow_upscale=True)(x).shape == (3, 32, 32)  # smaller images are resized up


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


def test_dynacl_weighting_gives_the_adversarial_term_weight_as_augmentation_weakens():
    """DynACL (and HSAT's "clean samples also" run): ((1-w) L_clean + (1+w) L_adv) / 2, w = lam (1 - s)."""
    assert loss_weights(1.0, lam=0.66, dynamic=True, only_adversarial=False) == pytest.approx((0.5, 0.5))
    assert loss_weights(0.0, lam=0.66, dynamic=True, only_adversarial=False) == pytest.approx((0.17, 0.83))
    weights = [loss_weights(s, lam=0.66, dynamic=True, only_adversarial=False) for s in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert all(a[1] < b[1] and a[0] > b[0] for a, b in zip(weights, weights[1:]))  # adversarial weight rises
    assert all(c + a == pytest.approx(1.0) for c, a in weights)
    assert loss_weights(0.25, lam=2.0, dynamic=False, only_adversarial=False) == (2.0, 1.0)
    assert loss_weights(0.25, lam=2.0, dynamic=True, only_adversarial=True) == (0.0, 1.0)
    assert clean_weight_at(0.0, lam=0.66, dynamic=True, only_adversarial=False) == pytest.approx(0.17)


def test_strength_decays_in_stages():
    values = [strength_at(s, 100, start=1.0, end=0.0, dynamic=True, stages=4) for s in range(100)]
    assert sorted(set(values), reverse=True) == [1.0, 0.75, 0.5, 0.25]
    assert values[24] == 1.0 and values[25] == 0.75 and values[99] == 0.25


# ---- pixel scale: data.resize and the size check, before any crop


def test_resize_by_size_or_factor_changes_what_the_model_sees():
    x = _image(112)
    half = F.resize(x, [56], antialias=True)
    direct = eval_transform(32)(x)
    by_size = eval_transform(32, resize={"size": 56})(x)
    by_scale = eval_transform(32, resize={"scale": 0.5})(x)
    assert torch.equal(direct, x[:, 40:72, 40:72])  # native resolution: the centre of the patch
    assert torch.equal(by_size, half[:, 12:44, 12:44])  # resized first, then the centre crop
    assert torch.equal(by_scale, by_size)  # 0.5 of 112 px is 56 px
    assert float((by_size - direct).abs().mean()) > 0.05
    # The shorter side goes to `size` (aspect kept); a factor scales both sides.
    assert resize_op({"size": 56})(torch.rand(3, 112, 224)).shape == (3, 56, 112)
    assert resize_op({"scale": 0.25})(torch.rand(3, 112, 224)).shape == (3, 28, 56)
    assert resize_op(None) is None


def test_training_resizes_before_the_crop_as_evaluation_does():
    x = _image(112)
    torch.manual_seed(0)
    # Crop only (strength 0, prob 0), and the crop is the whole resized patch: the same pixels.
    whole = train_transform(32, strength=0.0, prob=0.0, resize={"size": 32})(x)
    assert torch.equal(whole, eval_transform(32, resize={"size": 32})(x))
    assert torch.equal(whole, F.resize(x, [32], antialias=True))
    # A smaller crop is a window of the resized patch, not of the original.
    half = F.resize(x, [56], antialias=True)
    view = train_transform(32, strength=0.0, prob=0.0, resize={"scale": 0.5})(x)
    windows = half.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 25, 25, 32, 32)
    assert any(torch.equal(view, windows[:, i, j]) for i in range(25) for j in range(25))


def test_too_small_patch_raises_unless_upscaling_is_allowed():
    small = _image(24)
    for transform in (eval_transform(32), train_transform(32, prob=0.5)):
        with pytest.raises(PatchTooSmall, match=r"24x24 px.*32 px crop.*data\.resize.*data\.allow_upscale"):
            transform(small)
    with pytest.raises(PatchTooSmall, match=r"28x28 px after data\.resize \(from 56x56 px\)"):
        eval_transform(32, resize={"scale": 0.5})(_image(56))
    assert issubclass(PatchTooSmall, HSATError)
    assert eval_transform(32, allow_upscale=True)(small).shape == (3, 32, 32)
    assert train_transform(32, allow_upscale=True)(small).shape == (3, 32, 32)


@pytest.mark.parametrize("bad", [{"size": 0}, {"scale": -1.0}, {"size": 5.5}, {"size": 8, "scale": 0.5}, {"factor": 2}, 56])
def test_bad_resize_raises(bad):
    with pytest.raises(HSATError, match="data.resize"):
        eval_transform(32, resize=bad)


def test_schema_encodes_resize_as_size_or_scale():
    assert validate({}, "run")["data"]["resize"] is None
    assert validate({"data": {"resize": {"scale": 0.5}}}, "run")["data"]["resize"] == {"scale": 0.5}
    for bad in ({"size": 56, "scale": 0.5}, {"size": 4}, {"scale": 0}, 0.5, {}):
        with pytest.raises(HSATError, match="data.resize"):
            validate({"data": {"resize": bad}}, "run")


# ---- the `he` preset: HED stain jitter


def _ihc() -> torch.Tensor:
    """scikit-image's immunohistochemistry image (haematoxylin + DAB), a 128 px corner, (3, H, W) in [0, 1]."""
    return torch.from_numpy(data.immunohistochemistry()[:128, :128]).permute(2, 0, 1).float() / 255.0


def test_hed_stains_are_scikit_images():
    x = _ihc()
    jitter = HEDJitter()
    stains = jitter.to_hed(x)
    ref = color.rgb2hed(x.permute(1, 2, 0).double().numpy())
    assert np.abs(stains.clamp_min(0).permute(1, 2, 0).numpy() - ref).max() < 1e-5
    back = color.hed2rgb(ref)
    assert np.abs(jitter.from_hed(torch.from_numpy(ref).permute(2, 0, 1).float()).permute(1, 2, 0).numpy() - back).max() < 1e-5
    # Unlike rgb2hed -> hed2rgb, the round trip is the identity (nothing is clipped).
    assert float((jitter.from_hed(stains) - x).abs().max()) < 1e-5
    assert float((HEDJitter(scale=0.0, shift=0.0)(x) - x).abs().max()) < 1e-5


def test_hed_jitter_scales_and_shifts_each_stain_within_bounds():
    x = _ihc()
    jitter = HEDJitter()
    torch.manual_seed(0)
    for _ in range(10):
        y = jitter(x)
        assert y.shape == x.shape and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
        assert float((y - x).abs().mean()) > 1e-3  # colours change
        # Per stain, the jittered amounts are alpha * amount + beta: fit it where nothing was clamped.
        inside = ((y > 1e-4) & (y < 1 - 1e-4)).all(0).flatten()
        s_in, s_out = (jitter.to_hed(im).flatten(1)[:, inside].double() for im in (x, y))
        for c in range(3):
            design = torch.stack([s_in[c], torch.ones_like(s_in[c])], 1)
            alpha, beta = torch.linalg.lstsq(design, s_out[c, :, None]).solution.flatten().tolist()
            assert 1 - HED_SCALE - 1e-3 <= alpha <= 1 + HED_SCALE + 1e-3
            assert -HED_SHIFT - 1e-4 <= beta <= HED_SHIFT + 1e-4


def test_hed_jitter_follows_torchs_rng_only():
    x = _ihc()
    jitter = HEDJitter()
    torch.manual_seed(3)
    np.random.seed(0)
    a = jitter(x)
    torch.manual_seed(3)
    np.random.seed(1)  # numpy's global state plays no part
    assert torch.equal(a, jitter(x))
    assert not torch.equal(a, jitter(x))  # the next draw differs
    batch = torch.stack([x, x])
    torch.manual_seed(3)
    out = jitter(batch)
    assert not torch.equal(out[0], out[1])  # one draw per image of a batch


def test_hed_jitter_keeps_white_near_white():
    white = torch.ones(256, 3, 4, 4)
    torch.manual_seed(0)
    assert float(HEDJitter()(white).min()) > 0.9  # about 0.94 at the extreme shift
    t = train_transform(16, strength=1.0, prob=1.0, preset="he")
    assert min(float(t(torch.ones(3, 16, 16)).min()) for _ in range(100)) > 0.8  # with the colour jitter


def test_he_preset_shape_range_determinism_and_strength():
    x = _ihc()
    views = {}
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        t = train_transform(64, strength=1.0, prob=1.0, preset="he")
        y = t(x)
        assert y.shape == (3, 64, 64) and 0.0 <= float(y.min()) and float(y.max()) <= 1.0
        views.setdefault(seed, []).append(y)
    assert torch.equal(views[0][0], views[0][1])
    assert not torch.equal(views[0][0], views[1][0])
    # Strength 0: crop, flips and rotations only, so the view is a rotation/flip of a crop.
    torch.manual_seed(0)
    y = train_transform(128, strength=0.0, prob=1.0, preset="he")(x)
    turns = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    assert any(torch.equal(y, f) for r in turns for f in (r, r.flip(-1), r.flip(-2), r.flip(-1).flip(-2)))
    assert not any(isinstance(m, HEDJitter) for m in train_transform(16, 0.0, 1.0, preset="he").modules())
    with pytest.raises(HSATError, match="augment.preset"):
        train_transform(16, preset="ihc")


# ---- the `srh` preset: the recipe as it was


def _srh_before(image_size: int, strength: float = 1.0, prob: float = 0.3):
    """train_transform as it was before presets and data.resize (frozen copy)."""
    size, s, p = int(image_size), float(strength), float(prob)
    ops = [v2.RandomCrop(size)]  # (its _FitToSize left patches at least `size` px untouched)
    if s > 0 and p > 0:
        ops.append(v2.RandomApply([v2.RandomResizedCrop(size, scale=(1.0 - (1.0 - 0.08) * s, 1.0), antialias=True)], p=p))
    ops += [v2.RandomHorizontalFlip(p=p), v2.RandomVerticalFlip(p=p)]
    ps = p * s
    if ps > 0:
        b, c, sat, hue = (m * s for m in (0.4, 0.4, 0.4, 0.1))
        ops += [
            v2.RandomApply([v2.RandomChoice([v2.GaussianNoise(sigma=sg * s, clip=True) for sg in (0.01, 0.04, 0.07, 0.1)])], p=ps),
            v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=sat, hue=hue)], p=ps),
            v2.RandomAutocontrast(p=ps),
            v2.RandomSolarize(threshold=0.2 + (1.0 - 0.2) * (1.0 - s), p=ps),
            v2.RandomAdjustSharpness(sharpness_factor=1.0 + (2.0 - 1.0) * s, p=ps),
            v2.RandomApply([v2.GaussianBlur(5, sigma=1.0 * s)], p=ps),
            v2.RandomApply([v2.RandomAffine(degrees=10.0 * s, translate=(0.1 * s, 0.3 * s))], p=ps),
            v2.RandomErasing(p=ps, scale=(0.02 * s, 0.33 * s), ratio=(0.3, 3.3), value=0.0),
        ]
    ops.append(v2.Lambda(lambda im: im.clamp(0.0, 1.0)))
    return v2.Compose(ops)


@pytest.mark.parametrize("strength,prob", [(1.0, 0.3), (0.3, 0.3), (0.5, 1.0), (0.0, 0.5)])
def test_srh_preset_is_the_recipe_before_bit_for_bit(strength, prob):
    assert validate({}, "run")["augment"]["preset"] == "srh"  # the default
    images = [_image(24, seed) for seed in range(8)]
    for seed in range(3):
        torch.manual_seed(seed)
        new = train_transform(16, strength, prob)
        got = [new(x) for x in images for _ in range(4)]
        torch.manual_seed(seed)
        old = _srh_before(16, strength, prob)
        want = [old(x) for x in images for _ in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(got, want))
