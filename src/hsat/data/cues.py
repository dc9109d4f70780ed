"""How strong each class cue of the embedded cohort is, in /255 of the image the model sees.

An L-inf attack of radius eps shifts a patch's channel means by at most eps and changes a
texture of standard deviation below eps beyond recognition. So a cue is *robust* when its class
differences exceed a few eps (no 8/255 perturbation can forge them) and *fragile* when its
amplitude is below eps. `measure_cues` renders a cohort in memory with the generator's own code
and measures both, so the amplitudes in docs/synthetic_cohort.md are measurements, not settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hsat import CLASSES
from hsat.data.srh import srh_to_rgb
from hsat.data.synthetic import SynthParams, assign_classes, render_patient


def _rgb(raw: np.ndarray) -> np.ndarray:
    """(n, 2, H, W) uint16 -> (n, 3, H, W) float in [0, 1], the OpenSRH conversion the model sees."""
    return np.stack([srh_to_rgb(r).numpy() for r in raw])


def measure_cues(params: SynthParams | None = None, patients: int = 42, slides: int = 2, patches: int = 8,
                 size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Cue amplitudes of a cohort, in /255 of the converted image.

    - `intensity_nearest` (per class): L-inf distance between the class's mean channel intensities
      and those of its nearest class (class mean = mean over its patients of their patch means).
    - `intensity_patient_sd` (per class): the largest over channels of the sd of its patients' means.
    - `nuclear_contrast`: the protein gain inside a nucleus at the cohort average (a nucleus's edge
      against its background).
    - `texture_rms`: median over patches of the texture's RMS, measured as the difference between
      the cohort and the same cohort rendered without texture (same random draws otherwise).
    """
    p = params or SynthParams()
    flat = dataclasses.replace(p, texture_amplitude=0.0)
    labels = assign_classes(patients)
    patient_means: dict[str, list[np.ndarray]] = {c: [] for c in CLASSES}
    texture_rms = []
    for i, label in enumerate(labels):
        with_tex = render_patient(seed, i, label, slides, patches, size, p)
        without = render_patient(seed, i, label, slides, patches, size, flat)
        rgb = [_rgb(r) for r in with_tex]
        patient_means[label].append(np.mean([x.mean(axis=(2, 3)).mean(0) for x in rgb], axis=0))
        for a, b in zip(rgb, (_rgb(r) for r in without)):
            # The texture lives in channels 0 and 2 (the protein channel and CH3 - CH2).
            texture_rms.extend(np.sqrt(((a - b)[:, [0, 2]] ** 2).mean(axis=(1, 2, 3))).tolist())
    present = [c for c in CLASSES if patient_means[c]]
    centroid = {c: np.mean(patient_means[c], axis=0) for c in present}
    nearest = {}
    for c in present:
        others = [np.abs(centroid[c] - centroid[o]).max() for o in present if o != c]
        nearest[c] = 255.0 * float(min(others)) if others else float("nan")
    spread = {c: 255.0 * float(np.std(patient_means[c], axis=0, ddof=1).max()) if len(patient_means[c]) > 1
              else float("nan") for c in present}
    return {
        "intensity_nearest": nearest,
        "intensity_patient_sd": spread,
        "nuclear_contrast": 255.0 * p.nuclear_contrast,
        "texture_rms": 255.0 * float(np.median(texture_rms)),
    }
