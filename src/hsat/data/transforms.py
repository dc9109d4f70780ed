"""HiDisc/HSAT augmentations (torchvision v2) with a `strength` knob, and the eval transform.

Images are float tensors (3, H, W) in [0, 1] in and out: nothing here normalises (the model
does, so attacks live in pixel space) and every op keeps values in [0, 1].

The recipe follows HiDisc's strong SRH augmentations and HSAT's dynamic variant of them:
flips, gaussian noise, colour jitter, autocontrast, solarize, sharpness, gaussian blur, random
erasing, affine and random resized crop, each applied with probability `prob`. `strength` in
[0, 1] scales both how often (probability `prob * strength`) and how hard (magnitudes) the
photometric and geometric ops act; flips are always on with probability `prob`. Strength 1 is
the full recipe, strength 0 leaves only the crop and the flips (near-identity views).

Two presets share that structure (`augment.preset`): `srh`, the recipe above, and `he` for RGB
H&E patches: the same crop and zoom, flips and rotations by multiples of 90 degrees, then stain
jitter in HED space (`HEDJitter`) and a mild colour jitter.

Pixel scale (`data.resize`): before any crop the whole patch may be resized, to a shorter side
of N px (`{"size": N}`) or by a factor (`{"scale": 0.5}` takes 40x to 20x), in training and
evaluation alike. A patch still smaller than the crop is an error (`PatchTooSmall`; the datasets
add the file's path) unless `allow_upscale`, which resizes it up as earlier versions always did.

HSAT's dynamic augmentation decays strength over training (`strength_at`) and lets the clean
loss weight grow as `lambda * (1 - strength)` (`clean_weight_at`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from hsat.errors import HSATError

__all__ = [
    "PRESETS",
    "HEDJitter",
    "PatchTooSmall",
    "resize_op",
    "train_transform",
    "eval_transform",
    "strength_at",
    "clean_weight_at",
    "local_transform",
]

PRESETS = ("srh", "he")

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

# The `he` preset at strength 1.
HED_SCALE = 0.2  # each stain's amount is multiplied by U(1 - 0.2, 1 + 0.2) (Tellez's "HED-strong" range)
# ... and shifted by U(-0.002, 0.002) in rgb2hed's units (optical density / ln(1e6), so about
# +-0.03 OD): enough to tint, while a white pixel stays within about 7% of white at the extreme.
HED_SHIFT = 0.002
HE_JITTER = (0.1, 0.1, 0.1, 0.02)  # brightness, contrast, saturation, hue: mild, HED does the rest
_LOG_ADJUST = math.log(1e-6)  # rgb2hed's normalisation of optical density


class PatchTooSmall(HSATError):
    """A patch (after `data.resize`) smaller than the crop; the datasets re-raise it naming the file."""


class _ScaleBy(torch.nn.Module):
    """Resize both sides by `factor` (antialiased): `v2.Resize`'s functional form at a relative size."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, img: Tensor) -> Tensor:
        h, w = img.shape[-2:]
        return F.resize(img, [max(1, round(h * self.factor)), max(1, round(w * self.factor))], antialias=True)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def resize_op(resize: Mapping[str, Any] | None) -> torch.nn.Module | None:
    """`data.resize` as a transform: None (native resolution), `{"size": N}` (shorter side to N px)
    or `{"scale": F}` (both sides times F); antialiased either way."""
    if resize is None:
        return None
    if not isinstance(resize, Mapping) or len(resize) != 1 or next(iter(resize)) not in ("size", "scale"):
        raise HSATError(f"data.resize must be null, {{size: N}} or {{scale: F}}, got {resize!r}")
    (key, value), = resize.items()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HSATError(f"data.resize.{key} must be a positive number, got {value!r}")
    if key == "size":
        if int(value) != value:
            raise HSATError(f"data.resize.size is a side in whole pixels, got {value!r} (a factor is {{scale: F}})")
        return v2.Resize(int(value), antialias=True)
    return _ScaleBy(float(value))


def check_patch_size(path: str, image: Tensor, size: int, resize: Mapping[str, Any] | None = None,
                     allow_upscale: bool = False) -> None:
    """Raise HSATError naming `path` when `image` (after `resize`) cannot hold a `size` crop."""
    try:
        _FitToSize(size, resize, allow_upscale)(image)
    except PatchTooSmall as exc:
        raise HSATError(f"{path}: {exc}") from None


class _FitToSize(torch.nn.Module):
    """`data.resize` (if any), then make sure the patch holds an `size` crop.

    Larger images are left for a crop at that resolution, so training and evaluation see tissue
    at the same pixel scale (fine texture is a cue here, and rescaling would change it). A
    smaller one raises `PatchTooSmall` unless `allow_upscale`, which resizes it up (keeping aspect).
    """

    def __init__(self, size: int, resize: Mapping[str, Any] | None = None, allow_upscale: bool = False):
        super().__init__()
        self.size = int(size)
        self.resize = resize_op(resize)
        self.allow_upscale = bool(allow_upscale)

    def forward(self, img: Tensor) -> Tensor:
        h0, w0 = img.shape[-2:]
        if self.resize is not None:
            img = self.resize(img)
        h, w = img.shape[-2:]
        if min(h, w) >= self.size:
            return img
        if not self.allow_upscale:
            before = f" after data.resize (from {h0}x{w0} px)" if self.resize is not None else ""
            raise PatchTooSmall(
                f"patch is {h}x{w} px{before}, smaller than the {self.size} px crop (data.image_size, or "
                f"evaluation.image_size when set): set data.resize so that its shorter side is at least "
                f"{self.size} px, or data.allow_upscale: true to resize it up"
            )
        return F.resize(img, [self.size], antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}, allow_upscale={self.allow_upscale}"


class _RandomRot90(torch.nn.Module):
    """Rotate by 90, 180 or 270 degrees (uniformly; torch's RNG): exact, no interpolation."""

    def forward(self, img: Tensor) -> Tensor:
        return torch.rot90(img, int(torch.randint(1, 4, ())), dims=(-2, -1))


class HEDJitter(torch.nn.Module):
    """Stain jitter in HED space: per image, each stain amount `s` becomes `alpha * s + beta`.

    Tellez et al.'s H&E stain augmentation (IEEE TMI 2018, "Whole-slide mitosis detection in H&E
    breast histology using PHH3 as a reference to train distilled stain-invariant convolutional
    networks"; Medical Image Analysis 2019, "Quantifying the effects of data augmentation and
    stain color normalization in convolutional neural networks for computational pathology"):
    colour deconvolution (Ruifrok & Johnston) into haematoxylin, eosin and DAB, then
    `alpha ~ U(1 - scale, 1 + scale)`, `beta ~ U(-shift, shift)` per channel, drawn from torch's
    RNG, and back to RGB clamped to [0, 1].

    The stain matrices are scikit-image's (`skimage.color.hed_from_rgb`, `rgb_from_hed`) and the
    stain amounts are `skimage.color.rgb2hed`'s (optical density / ln(1e6)), but computed here in
    torch without `rgb2hed`'s clipping of negative amounts: with it a round trip is not the
    identity (off by up to 0.36 on skimage's own immunohistochemistry image), so even the
    mildest jitter would recolour pixels outside the stain cone.
    Input (..., 3, H, W) in [0, 1]; one draw per image.
    """

    def __init__(self, scale: float = HED_SCALE, shift: float = HED_SHIFT):
        super().__init__()
        # Only this preset needs scikit-image, so a study without it still imports hsat.
        try:
            from skimage.color import hed_from_rgb, rgb_from_hed
        except ImportError as exc:
            raise HSATError("augment.preset=he needs scikit-image (pip install scikit-image)") from exc
        if scale < 0 or shift < 0:
            raise HSATError(f"HEDJitter scale and shift must be non-negative, got {scale!r}, {shift!r}")
        self.scale = float(scale)
        self.shift = float(shift)
        self.register_buffer("hed_from_rgb", torch.as_tensor(hed_from_rgb, dtype=torch.float32), persistent=False)
        self.register_buffer("rgb_from_hed", torch.as_tensor(rgb_from_hed, dtype=torch.float32), persistent=False)

    def to_hed(self, img: Tensor) -> Tensor:
        """Stain amounts (..., 3 = H, E, D, H, W): `rgb2hed`'s, before its clipping at 0."""
        od = torch.log(img.clamp_min(1e-6)) / _LOG_ADJUST  # white -> 0, 1e-6 -> 1
        return torch.einsum("...chw,cs->...shw", od, self.hed_from_rgb.to(img.dtype))

    def from_hed(self, stains: Tensor) -> Tensor:
        """RGB in [0, 1] of stain amounts (`hed2rgb`)."""
        od = torch.einsum("...shw,sc->...chw", stains, self.rgb_from_hed.to(stains.dtype))
        return torch.exp(od * _LOG_ADJUST).clamp(0.0, 1.0)

    def forward(self, img: Tensor) -> Tensor:
        if img.ndim < 3 or img.shape[-3] != 3:
            raise HSATError(f"HEDJitter needs RGB images shaped (..., 3, H, W), got {tuple(img.shape)}")
        batch = img.shape[:-3]
        alpha = 1.0 + (2.0 * torch.rand(*batch, 3) - 1.0) * self.scale
        beta = (2.0 * torch.rand(*batch, 3) - 1.0) * self.shift
        stains = self.to_hed(img) * alpha.to(img)[..., None, None] + beta.to(img)[..., None, None]
        return self.from_hed(stains)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, shift={self.shift}"


def _clamp01(img: Tensor) -> Tensor:
    return img.clamp(0.0, 1.0)


def _check_size(image_size: int) -> int:
    if int(image_size) < 1:
        raise HSATError(f"image_size must be a positive number of pixels, got {image_size!r}")
    return int(image_size)


def train_transform(
    image_size: int,
    strength: float = 1.0,
    prob: float = 0.3,
    preset: str = "srh",
    resize: Mapping[str, Any] | None = None,
    allow_upscale: bool = False,
) -> Callable[[Tensor], Tensor]:
    """The training augmentation at one strength (cheap to build; rebuild when strength changes).

    `resize` (`data.resize`) and the size check come first; then a random `image_size` crop is
    followed, with probability `prob`, by a random resized crop keeping `1 - 0.92*strength` to
    100% of the area, then flips and the preset's strength-scaled ops: `srh` HiDisc's recipe,
    `he` rotations by 90 degrees (probability `prob`), HED stain jitter and a mild colour jitter.
    """
    size = _check_size(image_size)
    if not 0.0 <= strength <= 1.0:
        raise HSATError(f"augment strength must be in [0, 1], got {strength!r}")
    if not 0.0 <= prob <= 1.0:
        raise HSATError(f"augment.prob must be in [0, 1], got {prob!r}")
    if preset not in PRESETS:
        raise HSATError(f"augment.preset must be one of {list(PRESETS)}, got {preset!r}")
    s = float(strength)
    p = float(prob)
    ops: list[torch.nn.Module] = [_FitToSize(size, resize, allow_upscale), v2.RandomCrop(size)]
    if s > 0 and p > 0:
        # Zoom: fixed probability, range widens with strength (scale (1, 1) is the identity).
        ops.append(
            v2.RandomApply(
                [v2.RandomResizedCrop(size, scale=(1.0 - (1.0 - MIN_CROP_SCALE) * s, 1.0), antialias=True)], p=p
            )
        )
    return v2.Compose(ops + _view_ops(s, p, preset))


def local_transform(
    image_size: int,
    local_size: int,
    scale: tuple[float, float] = (0.05, 0.4),
    strength: float = 1.0,
    prob: float = 0.3,
    preset: str = "srh",
    resize: Mapping[str, Any] | None = None,
    allow_upscale: bool = False,
) -> Callable[[Tensor], Tensor]:
    """DINO's local crop: a random resized crop of `scale` of an `image_size` region, to
    `local_size` px, then the same flips and preset ops as `train_transform`."""
    size, small = _check_size(image_size), _check_size(local_size)
    lo, hi = (float(v) for v in scale)
    if not 0.0 < lo <= hi <= 1.0:
        raise HSATError(f"data.local_crops.scale must be 0 < low <= high <= 1, got {list(scale)}")
    if preset not in PRESETS:
        raise HSATError(f"augment.preset must be one of {list(PRESETS)}, got {preset!r}")
    ops: list[torch.nn.Module] = [_FitToSize(size, resize, allow_upscale), v2.RandomCrop(size),
                                  v2.RandomResizedCrop(small, scale=(lo, hi), antialias=True)]
    return v2.Compose(ops + _view_ops(float(strength), float(prob), preset))


def _view_ops(s: float, p: float, preset: str) -> list[torch.nn.Module]:
    """Flips and the preset's strength-scaled ops, ending with the clamp to [0, 1]."""
    ops: list[torch.nn.Module] = [v2.RandomHorizontalFlip(p=p), v2.RandomVerticalFlip(p=p)]
    ps = p * s  # how often the photometric/geometric ops fire
    if preset == "he":
        ops.append(v2.RandomApply([_RandomRot90()], p=p))
        if ps > 0:
            b, c, sat, hue = (m * s for m in HE_JITTER)
            ops += [
                v2.RandomApply([HEDJitter(scale=HED_SCALE * s, shift=HED_SHIFT * s)], p=ps),
                v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=sat, hue=hue)], p=ps),
            ]
    elif ps > 0:
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
    return ops


def eval_transform(
    image_size: int, resize: Mapping[str, Any] | None = None, allow_upscale: bool = False
) -> Callable[[Tensor], Tensor]:
    """Deterministic: `resize` (`data.resize`) and the size check, then center crop to `image_size`."""
    size = _check_size(image_size)
    return v2.Compose([_FitToSize(size, resize, allow_upscale), v2.CenterCrop(size)])


def strength_at(step: int, total_steps: int, start: float = 1.0, end: float = 0.0, dynamic: bool = True,
                stages: int = 0) -> float:
    """Augmentation strength at optimiser step `step`: linear decay from `start` to `end`.

    HSAT's dynamic augmentation (after DynACL) lowers the strength in stages; with `stages` > 0
    the step is rounded down to the start of its stage (`stages` equal stages, the first at
    `start`), with 0 it moves every step: `start` at step 0, `end` at step `total_steps` (and
    after). Constant `start` when not `dynamic`. A pure function of the step, so resuming needs
    no state; pass `functools.partial(strength_at, total_steps=..., ...)` as a dataset's
    `strength_fn` (partials of module-level functions pickle into DataLoader workers).
    """
    if not dynamic:
        return float(start)
    if total_steps <= 0:
        raise HSATError(f"total_steps must be positive for a strength schedule, got {total_steps!r}")
    frac = min(max(step / total_steps, 0.0), 1.0)
    if stages > 0:
        frac = math.floor(frac * stages) / stages
    return float(start + (end - start) * frac)


def loss_weights(strength: float, lam: float, dynamic: bool, only_adversarial: bool) -> tuple[float, float]:
    """(clean, adversarial) weights of the two loss terms.

    Adversarial views only: (0, 1). Under dynamic augmentation, DynACL's weighting (Luo et al.
    2023), which HSAT's "clean samples also" run uses: w = lam * (1 - strength), loss =
    ((1 - w) L_clean + (1 + w) L_adv) / 2, so the adversarial term gains weight as the
    augmentation weakens (lam = 0.66 in the reference). Otherwise (lam, 1): a fixed clean weight.
    """
    if only_adversarial:
        return 0.0, 1.0
    if dynamic:
        w = float(lam) * (1.0 - float(strength))
        return (1.0 - w) / 2.0, (1.0 + w) / 2.0
    return float(lam), 1.0


def clean_weight_at(strength: float, lam: float, dynamic: bool, only_adversarial: bool) -> float:
    """The clean term's weight of `loss_weights`."""
    return loss_weights(strength, lam, dynamic, only_adversarial)[0]
