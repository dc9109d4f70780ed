"""The embedded SRH-like cohort: OpenSRH's exact layout, generated on the spot for everyone without the data.

Why it looks the way it does (docs/synthetic_cohort.md has the full design and calibration):

- **Hierarchy.** Every patient draws a latent offset of its class's tissue statistics (nucleus
  density, size, elongation, alignment, lipid/protein levels, nuclear contrast) that all of its
  slides share; each slide adds a smaller offset and its own illumination; each patch adds its
  own jitter and pixel noise. Patient and slide membership are therefore discriminative, as
  HiDisc's positives assume.
- **Two kinds of class cue.** Coarse morphology is only weakly class-informative (class means
  overlap under the patient spread), so it is learnable but noisy; a perturbation of 8/255
  cannot fake it. A fine, low-amplitude (a few /255 of the converted image), mid-frequency,
  class-specific texture in the protein channel (band-pass speckle whose spectral peak --
  frequency and orientation -- depends on the class) is highly predictive; a non-robust encoder
  latches onto it and an 8/255 PGD perturbation can erase and forge it. This mirrors real SRH,
  where HiDisc reaches ~83% clean patch accuracy and ~5% under PGD 8/255.
- **Units.** Raw channels are computed as floats in the release's units (raw / 65536) and
  written as uint16; the model sees (CH3 - CH2 + 5000/65536, CH2, CH3), so the protein
  texture appears in the first and third converted channels with the same amplitude.

All generation parameters live in `SynthParams`, so the calibration is data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import tifffile

from hsat import CLASSES
from hsat.errors import HSATError
from hsat.io import make_temp_dir, remove_temporaries, temporary_dir_prefix

log = logging.getLogger(__name__)

MARKER = Path("meta") / "synthetic.json"
"""Provenance file written beside the OpenSRH meta files; marks a directory as ours to replace."""

# Morphology features, in standardised units (0 = cohort average), mapped to pixels in `_morph`.
FEATURES = ("density", "radius", "elongation", "alignment", "lipid", "protein", "contrast")

# Class means of the morphology features (rows follow FEATURES), the cohort adopted by its
# calibration (attempt J, docs/synthetic_cohort.md). Nuclear geometry loosely after SRH histology:
# HGG dense and pleomorphic; metastases with large nuclei; meningioma and schwannoma elongated and
# aligned; pituitary adenoma dense, uniform and round; normal white matter sparse; LGG mildly
# hypercellular. Background lipid and protein sit on a 3 x 3 grid of levels (-1, 0, 1), so that
# with `intensity_gain` each class's mean channel intensities lie more than 3 x 8/255 from its
# nearest class's (a robust cue) while the patient spread keeps that cue noisy.
CLASS_MORPHOLOGY: dict[str, tuple[float, ...]] = {
    #           dens   rad   elong  align  lipid  prot   contr
    "hgg":     (2.0,  1.2,   0.4,  -1.0,   0.0,   1.0,   0.6),
    "lgg":     (0.2, -0.8,   0.0,  -0.8,   1.0,   0.0,  -0.3),
    "mening":  (1.0,  0.2,   1.4,   1.6,   0.0,   0.0,  -0.2),
    "metast":  (1.4,  2.0,  -0.6,  -1.2,  -1.0,   1.0,   0.4),
    "normal":  (-2.4, -1.6, -0.4,  -0.4,   1.0,  -1.0,  -0.8),
    "pituita": (2.0, -0.6,  -1.8,  -1.2,  -1.0,   0.0,   0.2),
    "schwan":  (-0.4, -0.4,  2.4,   2.0,   0.0,  -1.0,  -0.3),
}

# Class texture signatures: (spatial frequency in cycles/px, orientation). Orientation "h"/"v"
# put the spectral peak on one axis, "x" on both diagonals (cross-hatch); all three survive
# horizontal and vertical flips, the augmentations HiDisc uses.
# Frequencies (0.12-0.24 cycles/px, periods of 4-8 px) were lowered from 0.22-0.44 when the cohort
# was calibrated against the HiDisc baseline: its blur and resized crops erase finer textures.
CLASS_TEXTURE: dict[str, tuple[float, str]] = {
    "hgg": (0.12, "h"),
    "lgg": (0.12, "v"),
    "mening": (0.16, "x"),
    "metast": (0.20, "h"),
    "normal": (0.20, "v"),
    "pituita": (0.12, "x"),
    "schwan": (0.24, "x"),
}
_ORIENT_DEG = {"h": (0.0,), "v": (90.0,), "x": (45.0, 135.0)}


@dataclass(frozen=True)
class SynthParams:
    """Generation parameters of the embedded cohort (the calibration knobs).

    Morphology features are standardised: a patient's feature vector is
    `morph_separation * class_mean + patient_sd * N(0, 1)`, a slide's adds `slide_sd * N(0, 1)`,
    a patch's adds `patch_sd * N(0, 1)`. Intensities are in raw/65536 units; amplitudes marked
    /255 are in units of the converted 3-channel image.
    """

    # --- coarse morphology (robust cues): how class-informative, and the hierarchy's spread
    morph_separation: float = 0.9
    """Scale of the class means of the morphology features; 0 makes morphology class-blind."""
    patient_sd: float = 0.5
    """Patient-level latent offset of every morphology feature, shared by all its slides.

    0.5 rather than 0.7 (HiDisc calibration): a larger spread makes the patient differences that
    HiDisc learns mostly class-irrelevant, and the baseline's clean accuracy drops to 30-50%."""
    slide_sd: float = 0.3
    """Slide-level offset on top of the patient's."""
    patch_sd: float = 0.35
    """Patch-level jitter of the morphology features."""
    density_per_kpx: float = 14.0
    """Mean nuclei per 1000 px^2 at feature value 0 (x exp(0.45 * density))."""
    radius_px: float = 2.4
    """Mean nucleus radius in px at feature value 0 (x exp(0.25 * radius))."""
    pleomorphism: float = 0.18
    """Log-normal spread of nucleus radii within a patch."""
    lipid_level: float = 0.24
    """Background CH2 (lipid) at feature value 0 (+ 0.045 * lipid)."""
    protein_level: float = 0.50
    """Background CH3 (protein) at feature value 0 (+ 0.035 * protein)."""
    nuclear_contrast: float = 0.13
    """Protein gain inside a nucleus at feature value 0 (x exp(0.3 * contrast))."""
    nuclear_lipid_drop: float = 0.45
    """Fraction of the background lipid missing inside a nucleus (nuclei are lipid-poor)."""
    intensity_gain: float = 3.5
    """Scale of the class (and patient/slide/patch) offsets of background lipid and protein:
    the channel-intensity cue's strength."""
    intensity_sd_scale: float = 0.45
    """Scale of the patient, slide and patch spread of the lipid and protein features alone (the
    intensity cue's within-class spread, beside the other features' `patient_sd` etc.)."""
    cloud_amplitude: float = 0.025
    """Smooth tissue-density variation (low-pass noise, ~5 px correlation) in both channels."""
    slide_gain_sd: float = 0.02
    """Slide-level multiplicative illumination change (log-normal) of both channels."""
    # --- fine texture (non-robust cue)
    texture_amplitude: float = 6.0
    """Standard deviation of the class texture in the protein channel, in /255 of the converted image."""
    texture_amplitude_sd: float = 0.2
    """Patch-level log-normal spread of the texture amplitude (some patches carry little)."""
    texture_purity: float = 0.92
    """Probability that a patch's texture is its own class's; otherwise another class's (a mimic)."""
    texture_bandwidth: float = 0.035
    """Radial width (cycles/px) of the texture's spectral peak."""
    texture_angle_sd: float = 8.0
    """Angular width (degrees) of the texture's spectral peak."""
    texture_patient_jitter: float = 0.12
    """Patient-level log-normal jitter of the texture frequency (a patient's own fingerprint)."""
    noise_sd: float = 1.5
    """White pixel noise per raw channel, in /255."""
    class_morphology: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(CLASS_MORPHOLOGY))
    class_texture: dict[str, tuple[float, str]] = field(default_factory=lambda: dict(CLASS_TEXTURE))


def synth_params(overrides: Mapping[str, Any] | None = None, source: str = "dataset.synth.params") -> SynthParams:
    """SynthParams with `overrides` (field -> value) applied; an unknown field or a value of the
    wrong type is an HSATError naming `source` and the field."""
    base = SynthParams()
    if not overrides:
        return base
    fields = {f.name: f for f in dataclasses.fields(SynthParams)}
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise HSATError(f"{source}: unknown cohort parameter {key!r} (one of: {', '.join(fields)})")
        default = getattr(base, key)
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise HSATError(f"{source}: {key} must be a number, not {value!r}")
            value = float(value)
        elif isinstance(default, dict):
            if not isinstance(value, Mapping) or not set(value) <= set(default):
                raise HSATError(f"{source}: {key} must map classes ({', '.join(default)}) to values, not {value!r}")
            value = {**default, **{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}}
        values[key] = value
    return dataclasses.replace(base, **values)


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------


def _lowpass_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise (via FFT) over the last two axes, unit std per image."""
    h, w = shape[-2:]
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    filt = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=(h, w))
    return out / (out.std(axis=(-2, -1), keepdims=True) + 1e-12)


def _texture_filter(size: int, freq: float, orient: str, p: SynthParams) -> np.ndarray:
    """Spectral magnitude (size, size//2+1) of a class texture: gaussian bumps at +-(freq, angle)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.hypot(fx, fy)
    angle = np.degrees(np.arctan2(fy, fx)) % 180.0
    radial = np.exp(-0.5 * ((radius - freq) / p.texture_bandwidth) ** 2)
    angular = np.zeros_like(radius)
    for theta in _ORIENT_DEG[orient]:
        d = np.abs(angle - theta)
        d = np.minimum(d, 180.0 - d)
        angular = np.maximum(angular, np.exp(-0.5 * (d / p.texture_angle_sd) ** 2))
    return radial * angular


def _bandpass(noise: np.ndarray, filt: np.ndarray) -> np.ndarray:
    """Band-pass speckle: white `noise` (n, size, size) through `filt`, unit std per patch."""
    out = np.fft.irfft2(np.fft.rfft2(noise) * filt, s=noise.shape[-2:])
    return out / (out.std(axis=(-2, -1), keepdims=True) + 1e-12)


def _render_nuclei(rng: np.random.Generator, z: np.ndarray, size: int, p: SynthParams) -> np.ndarray:
    """Soft nucleus occupancy in [0, 1], shape (n, size, size), from per-patch features z (n, F)."""
    n = z.shape[0]
    density = p.density_per_kpx * np.exp(0.45 * z[:, 0]) * size * size / 1000.0
    counts = rng.poisson(density)
    nmax = max(int(counts.max()), 1)
    valid = np.arange(nmax)[None, :] < counts[:, None]  # (n, nmax)
    radius = p.radius_px * np.exp(0.25 * z[:, 1])[:, None] * np.exp(p.pleomorphism * rng.standard_normal((n, nmax)))
    radius = np.clip(radius, 0.8, 3.0 * p.radius_px)
    aspect = np.exp(0.35 * np.abs(z[:, 2]) + 0.15)[:, None] * np.exp(0.1 * rng.standard_normal((n, nmax)))
    # Alignment: nuclei orientations concentrate around a per-patch direction as alignment grows.
    concentration = np.exp(1.2 * z[:, 3])[:, None]
    base = rng.uniform(0, np.pi, size=(n, 1))
    phi = base + rng.standard_normal((n, nmax)) / np.sqrt(concentration) * 0.9
    cy = rng.uniform(-2, size + 2, size=(n, nmax))
    cx = rng.uniform(-2, size + 2, size=(n, nmax))

    # Splat each nucleus into a local window, then scatter-add (vectorised over all nuclei).
    half = int(np.ceil(3.0 * p.radius_px * 1.6)) + 1
    pad = half + 3
    off = np.arange(-half, half + 1)
    iy = np.floor(cy).astype(np.int64)[..., None, None] + off[:, None]  # (n, nmax, w, 1)
    ix = np.floor(cx).astype(np.int64)[..., None, None] + off[None, :]  # (n, nmax, 1, w)
    dy = iy + 0.5 - cy[..., None, None]
    dx = ix + 0.5 - cx[..., None, None]
    c, s = np.cos(phi)[..., None, None], np.sin(phi)[..., None, None]
    u = (dx * c + dy * s) / (radius * np.sqrt(aspect))[..., None, None]
    v = (-dx * s + dy * c) / (radius / np.sqrt(aspect))[..., None, None]
    rho = np.sqrt(u * u + v * v)
    prof = 1.0 / (1.0 + np.exp((rho - 1.0) * 6.0))  # soft-edged ellipse
    prof = prof * valid[..., None, None]
    hp = size + 2 * pad
    flat = (np.arange(n)[:, None, None, None] * hp + (iy + pad)) * hp + (ix + pad)
    flat, prof = np.broadcast_arrays(flat, prof)
    acc = np.bincount(flat.ravel(), weights=prof.ravel(), minlength=n * hp * hp).reshape(n, hp, hp)
    acc = acc[:, pad : pad + size, pad : pad + size]
    return 1.0 - np.exp(-2.0 * acc)  # soft union of overlapping nuclei


INTENSITY_FEATURES = (FEATURES.index("lipid"), FEATURES.index("protein"))


def spread_scale(p: SynthParams) -> np.ndarray:
    """Per-feature factor on the patient/slide/patch spread (the intensity features' own scale)."""
    scale = np.ones(len(FEATURES))
    scale[list(INTENSITY_FEATURES)] = p.intensity_sd_scale
    return scale


def _morph(z: np.ndarray, p: SynthParams) -> dict[str, np.ndarray]:
    return {
        "lipid": p.lipid_level + 0.045 * p.intensity_gain * z[:, 4],
        "protein": p.protein_level + 0.035 * p.intensity_gain * z[:, 5],
        "contrast": p.nuclear_contrast * np.exp(0.3 * z[:, 6]),
    }


def render_slide(
    rng: np.random.Generator,
    label: str,
    z_slide: np.ndarray,
    texture_freq: float,
    n: int,
    size: int,
    p: SynthParams,
) -> np.ndarray:
    """The raw patches of one slide: uint16 (n, 2, size, size) = (CH2, CH3) in release units."""
    z = z_slide[None, :] + p.patch_sd * spread_scale(p) * rng.standard_normal((n, len(FEATURES)))
    m = _morph(z, p)
    nuc = _render_nuclei(rng, z, size, p)
    cloud = _lowpass_noise(rng, (n, size, size), 5.0) * p.cloud_amplitude
    gain = np.exp(p.slide_gain_sd * rng.standard_normal(2))

    lipid = (m["lipid"][:, None, None] + cloud) * (1.0 - p.nuclear_lipid_drop * nuc)
    protein = m["protein"][:, None, None] + 0.6 * cloud + m["contrast"][:, None, None] * nuc

    # Fine texture: the class's own signature (at the patient's jittered frequency), except for
    # mimic patches that carry another class's signature.
    names = list(p.class_texture)
    own = rng.random(n) < p.texture_purity
    mimic = rng.choice([c for c in names if c != label], size=n)
    amp = p.texture_amplitude / 255.0 * np.exp(p.texture_amplitude_sd * rng.standard_normal(n))
    noise_field = rng.standard_normal((n, size, size))
    texture = np.empty((n, size, size))
    for cls in dict.fromkeys([label, *mimic.tolist()]):
        sel = own if cls == label else (~own & (mimic == cls))
        if not sel.any():
            continue
        freq = texture_freq if cls == label else p.class_texture[cls][0]
        texture[sel] = _bandpass(noise_field[sel], _texture_filter(size, freq, p.class_texture[cls][1], p))
    protein = protein + amp[:, None, None] * texture

    raw = np.stack((lipid * gain[0], protein * gain[1]), axis=1)
    raw = raw + p.noise_sd / 255.0 * rng.standard_normal(raw.shape)
    return np.clip(np.rint(raw * 65536.0), 0, 65535).astype(np.uint16)


# ----------------------------------------------------------------------------------------------
# cohort
# ----------------------------------------------------------------------------------------------


def render_patient(seed: int, index: int, label: str, slides: int, patches: int, size: int, p: SynthParams
                   ) -> list[np.ndarray]:
    """The raw slides (uint16 (patches, 2, size, size) each) of patient `index` of a cohort seed."""
    rng = np.random.default_rng([seed, index])
    mean = np.asarray(p.class_morphology[label], dtype=np.float64)
    scale = spread_scale(p)
    z_patient = p.morph_separation * mean + p.patient_sd * scale * rng.standard_normal(len(FEATURES))
    freq = p.class_texture[label][0] * float(np.exp(p.texture_patient_jitter * rng.standard_normal()))
    out = []
    for _ in range(slides):
        z_slide = z_patient + p.slide_sd * scale * rng.standard_normal(len(FEATURES))
        out.append(render_slide(rng, label, z_slide, freq, patches, size, p))
    return out


def assign_classes(patients: int) -> list[str]:
    """Patients spread over the seven classes round-robin (class sizes differ by at most one)."""
    return [CLASSES[i % len(CLASSES)] for i in range(patients)]


def stratified_split(labels: list[str], val_fraction: float, rng: np.random.Generator) -> list[str]:
    """Patient-level split, stratified by class; a class with >= 2 patients is in both splits."""
    split = ["train"] * len(labels)
    for cls in sorted(set(labels)):
        idx = [i for i, c in enumerate(labels) if c == cls]
        if len(idx) < 2:
            continue
        n_val = int(np.clip(round(val_fraction * len(idx)), 1, len(idx) - 1))
        for i in rng.permutation(idx)[:n_val]:
            split[int(i)] = "val"
    return split


def _check_args(patients: int, slides: int, patches: int, size: int, val_fraction: float) -> None:
    if patients < len(CLASSES):
        raise HSATError(f"--patients must be at least {len(CLASSES)} (one per class); got {patients}")
    if slides < 1 or patches < 1:
        raise HSATError(f"--slides and --patches must be at least 1; got {slides}, {patches}")
    if not 8 <= size <= 1024:
        raise HSATError(f"--size must be between 8 and 1024 px; got {size}")
    if not 0.0 < val_fraction < 1.0:
        raise HSATError(f"--val-fraction must lie strictly between 0 and 1; got {val_fraction}")


def _prepare_target(out: Path) -> None:
    """Refuse to replace a non-empty directory that is not a synthetic cohort of ours."""
    if out.exists() and not out.is_dir():
        raise HSATError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise HSATError(
            f"{out}: directory is not empty and holds no synthetic cohort ({MARKER} missing); "
            "refusing to overwrite it -- choose another --out or empty it"
        )


def synthesize_cohort(
    out: str | os.PathLike,
    patients: int = 84,
    slides: int = 2,
    patches: int = 24,
    size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.42,
    params: SynthParams | None = None,
) -> Path:
    """Write an SRH-like cohort in the OpenSRH layout under `out` and return `out`.

    Deterministic for a seed (byte-identical files). The cohort is built in a temporary folder
    beside `out` and renamed into place, so an interrupted run never leaves a cohort that looks
    complete. An existing `out` may be empty or hold an earlier synthetic cohort (replaced).
    """
    p = params or SynthParams()
    _check_args(patients, slides, patches, size, val_fraction)
    out = Path(out).absolute()
    _prepare_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    labels = assign_classes(patients)
    width = max(3, len(str(patients)))
    ids = [f"SYN{i + 1:0{width}d}" for i in range(patients)]
    split = stratified_split(labels, val_fraction, np.random.default_rng([seed, 0x5EED]))

    for left in remove_temporaries(out):  # what a killed run left: it never became the cohort
        log.info("removed %s (left by an interrupted run)", left)
    tmp = make_temp_dir(out.parent, prefix=temporary_dir_prefix(out))
    try:
        meta: dict[str, dict] = {}
        for i, (pid, label) in enumerate(zip(ids, labels)):
            slide_meta = {}
            for s, raw in enumerate(render_patient(seed, i, label, slides, patches, size, p)):
                sid = str(s + 1)
                folder = tmp / "studies" / pid / sid / "patches"
                folder.mkdir(parents=True)
                names = []
                for k in range(patches):
                    rel = f"studies/{pid}/{sid}/patches/{pid}-{sid}-{k:04d}.tif"
                    tifffile.imwrite(tmp / rel, raw[k], photometric="minisblack", planarconfig="separate", metadata=None)
                    names.append(rel)
                key = "normal_patches" if label == "normal" else "tumor_patches"
                other = "tumor_patches" if label == "normal" else "normal_patches"
                slide_meta[sid] = {key: names, other: [], "nondiagnostic_patches": []}
            meta[pid] = {"class": label, "slides": slide_meta}
        (tmp / "meta").mkdir()
        _dump(tmp / "meta" / "opensrh.json", meta)
        _dump(
            tmp / "meta" / "train_val_split.json",
            {s: [pid for pid, sp in zip(ids, split) if sp == s] for s in ("train", "val")},
        )
        args = dict(patients=patients, slides=slides, patches=patches, size=size, seed=seed, val_fraction=val_fraction)
        _dump(tmp / MARKER, {"generator": "hsat.data.synthetic", "args": args, "params": dataclasses.asdict(p)})
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished cohort onto `out`; an old cohort there is moved aside first, then deleted."""
    _prepare_target(out)  # re-check: something may have appeared while we were generating
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = make_temp_dir(out.parent, prefix=temporary_dir_prefix(out, "old"))
            os.replace(out, old)  # onto the empty folder: a kill here leaves it for remove_temporaries
        else:
            out.rmdir()
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
