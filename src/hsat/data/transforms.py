"""HiDisc/HSAT augmentations (torchvision v2) with a `strength` knob, and the eval transform.

Images are float tensors (3, H, W) in [0, 1] in and out: nothing here normalises (the model
does, so attacks live in pixel space) and every op keeps values in [0, 1].

The recipe follows HiDisc's strong SRH augmentations and HSAT's dynamic variant of them:
flips, gaussian noise, colour jitter, autocontrast, solarize, sharpness, gaussian blur, random
erasing, affine and random resized crop, each applied with probability `prob`. `strength` in
[0, 1] scales both how often (probability `prob * strength`) and how hard (magnitudes) the
photometric and geometric ops act; flips are always on with probability `prob`. Strength 1 is
the full recipe, strength 0 leaves only the crop and the flips (near-identity views).

HSAT's dynamic augmentation decays strength over training (`strength_at`) and lets the clean
loss weight grow as `lambda * (1 - strength)` (`clean_weight_at`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from hsat.errors import HSATError

__all__ = ["train_transform", "eval_transform", "strength_at", "clean_weight_at"]

# Magnitudes of the full (strength 1) recipe, as in HiDisc/HSAT's SRH augmentations.
NOISE_SIGMAS = (0.01, 0.04, 0.07, 0.1)  # std range 0.01-0.1, drawn from a few levels
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
SOLARIZE_THRESHOLD = 0.2  # at strength 1; rises to 1.0 (no effect) as strength -> 0
SHARPNESS_FACTOR = 2.0
BLUR_KERNEL = 5
BLUR_SIGMA = 1.0
AFFINE_DEGREES = 10.0
AFFINE_TRANSLATE = (0.1, 0.3)  # max horizontal / vertical shift, fractions of the side
ERASE_SCALE = (0.02, 0.33)
MIN_CROP_SCALE = 0.08  # random resized crop keeps 8%-100% of the area at strength 1


class _FitToSize(torch.nn.Module):
    """Resize (keeping aspect) only when the image is smaller than `size` on some side.

    Larger images are left for a crop at native resolution, so training and evaluation see
    tissue at the same pixel scale (fine texture is a cue here, and rescaling would change it).
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def forward(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        if min(h, w) >= self.size:
            return img
        return F.resize(img, [self.size], antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _clamp01(img: Tensor) -> Tensor:
    return img.clamp(0.0, 1.0)


def _check_size(image_size: int) -> int:
    if int(image_size) < 1:
        raise HSATError(f"image_size must be a positive number of pixels, got {image_size!r}")
    return int(image_size)


def train_transform(image_size: int, strength: float = 1.0, prob: float = 0.3) -> Callable[[Tensor], Tensor]:
    """The training augmentation at one strength (cheap to build; rebuild when strength changes).

    A random `image_size` crop at native resolution (resizing first only images that are
    smaller) is followed, with probability `prob`, by a random resized crop keeping
    `1 - 0.92*strength` to 100% of the area, then flips and the strength-scaled ops.
    """
    size = _check_size(image_size)
    if not 0.0 <= strength <= 1.0:
        raise HSATError(f"augment strength must be in [0, 1], got {strength!r}")
    if not 0.0 <= prob <= 1.0:
        raise HSATError(f"augment.prob must be in [0, 1], got {prob!r}")
    s = float(strength)
    p = float(prob)
    ops: list[torch.nn.Module] = [_FitToSize(size), v2.RandomCrop(size)]
    if s > 0 and p > 0:
        # Zoom: fixed probability, range widens with strength (scale (1, 1) is the identity).
        ops.append(
            v2.RandomApply(
                [v2.RandomResizedCrop(size, scale=(1.0 - (1.0 - MIN_CROP_SCALE) * s, 1.0), antialias=True)], p=p
            )
        )
    ops += [v2.RandomHorizontalFlip(p=p), v2.RandomVerticalFlip(p=p)]
    ps = p * s  # how often the photometric/geometric ops fire
    if ps > 0:
        b, c, sat, hue = (m * s for m in JITTER)
        ops += [
            v2.RandomApply([v2.RandomChoice([v2.GaussianNoise(sigma=sg * s, clip=True) for sg in NOISE_SIGMAS])], p=ps),
            v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=sat, hue=hue)], p=ps),
            v2.RandomAutocontrast(p=ps),
            v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD + (1.0 - SOLARIZE_THRESHOLD) * (1.0 - s), p=ps),
            v2.RandomAdjustSharpness(sharpness_factor=1.0 + (SHARPNESS_FACTOR - 1.0) * s, p=ps),
            v2.RandomApply([v2.GaussianBlur(BLUR_KERNEL, sigma=BLUR_SIGMA * s)], p=ps),
            v2.RandomApply(
                [v2.RandomAffine(degrees=AFFINE_DEGREES * s, translate=tuple(t * s for t in AFFINE_TRANSLATE))],
                p=ps,
            ),
            v2.RandomErasing(p=ps, scale=(ERASE_SCALE[0] * s, ERASE_SCALE[1] * s), ratio=(0.3, 3.3), value=0.0),
        ]
    ops.append(v2.Lambda(_clamp01))
    return v2.Compose(ops)


def eval_transform(image_size: int) -> Callable[[Tensor], Tensor]:
    """Deterministic: center crop to `image_size` (resizing first only images that are smaller)."""
    size = _check_size(image_size)
    return v2.Compose([_FitToSize(size), v2.CenterCrop(size)])


def strength_at(step: int, total_steps: int, start: float = 1.0, end: float = 0.0, dynamic: bool = True) -> float:
    """Augmentation strength at optimiser step `step`: linear decay from `start` to `end`.

    Linear, as HSAT's dynamic augmentation (which lowers strength linearly in stages of 50
    epochs); here it moves every step: `start` at step 0, `end` at step `total_steps` (and
    after). Constant `start` when not `dynamic`. A pure function of the step, so resuming needs
    no state; pass `functools.partial(strength_at, total_steps=..., ...)` as a dataset's
    `strength_fn` (partials of module-level functions pickle into DataLoader workers).
    """
    if not dynamic:
        return float(start)
    if total_steps <= 0:
        raise HSATError(f"total_steps must be positive for a strength schedule, got {total_steps!r}")
    frac = min(max(step / total_steps, 0.0), 1.0)
    return float(start + (end - start) * frac)


def clean_weight_at(strength: float, lam: float, dynamic: bool, only_adversarial: bool) -> float:
    """Weight of the clean loss beside the adversarial one.

    0 when training only on adversarial views; `lam * (1 - strength)` under dynamic
    augmentation (as views get easier, the clean term gains weight); `lam` otherwise.
    """
    if only_adversarial:
        return 0.0
    if dynamic:
        return float(lam) * (1.0 - float(strength))
    return float(lam)
