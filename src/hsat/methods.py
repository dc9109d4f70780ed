"""Named method variants. A variant is data: which hierarchy levels it minimises and maximises.

All variants see the same batch (patients x slides x patches x views); they differ only in the
levels of the hierarchical loss used by the encoder (min) and by the inner attack (max).
"""

from __future__ import annotations

from typing import Any, Mapping

from hsat import LEVELS
from hsat.errors import HSATError

ALL = ["patient", "slide", "patch"]

VARIANTS: dict[str, dict[str, Any]] = {
    # Non-adversarial baseline (HiDisc, Cheng et al. CVPR 2023).
    "hidisc": {"adversarial": False, "min_levels": ALL, "max_levels": ALL},
    # HSAT-Patient: the full method.
    "hsat": {"adversarial": True, "min_levels": ALL, "max_levels": ALL},
    # Instance-level adversarial contrastive learning (views of a patch are the only positives).
    "hsat_patch": {"adversarial": True, "min_levels": ["patch"], "max_levels": ["patch"]},
    # Patch + slide levels.
    "hsat_slide": {"adversarial": True, "min_levels": ["slide", "patch"], "max_levels": ["slide", "patch"]},
    # Table 4 (L_max ablation): the attack maximises fewer levels; the encoder minimises all three.
    "hsat_lmax_patch": {"adversarial": True, "min_levels": ALL, "max_levels": ["patch"]},
    "hsat_lmax_patch_slide": {"adversarial": True, "min_levels": ALL, "max_levels": ["slide", "patch"]},
}


def resolve_method(method: Mapping[str, Any]) -> dict[str, Any]:
    """Expand a method section: start from the named variant, let explicit keys override it."""
    name = method.get("name", "hsat")
    if name not in VARIANTS and not {"adversarial", "min_levels", "max_levels"} <= set(method):
        raise HSATError(
            f"method.name {name!r} is not a known variant ({', '.join(VARIANTS)}); "
            "a custom variant must set adversarial, min_levels and max_levels"
        )
    out = dict(VARIANTS.get(name, {}))
    out.update({k: v for k, v in method.items()})
    out["name"] = name
    weights = {lvl: 1.0 for lvl in LEVELS}
    weights.update(out.get("level_weights") or {})
    out["level_weights"] = weights
    out.setdefault("temperature", 0.07)
    out.setdefault("base_temperature", 0.07)
    # Keep levels in canonical order (patient, slide, patch) so logs and names are stable.
    out["min_levels"] = [lvl for lvl in LEVELS if lvl in out["min_levels"]]
    out["max_levels"] = [lvl for lvl in LEVELS if lvl in out["max_levels"]]
    return out
