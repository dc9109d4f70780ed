"""The methods, one registry: name -> entry (display label, table role, the settings it fixes).

A method section of a run config names an entry and may override its keys; `resolve_method`
expands it, `build_objective` turns it into the objective the training loop asks for views and
losses (`hsat.methods.base.Objective`). HiDisc and the HSAT family differ only in the levels of
the hierarchical loss the encoder minimises and the attack maximises; every variant sees the
same batch (patients x slides x patches x views).
"""

from __future__ import annotations

from typing import Any, Mapping

from hsat import LEVELS
from hsat.errors import HSATError
from hsat.methods.base import MethodEntry, Objective
from hsat.methods.dino import DINO
from hsat.methods.hidisc import HiDisc
from hsat.methods.hlss import HLSS
from hsat.methods.robust import Robust
from hsat.methods.supervised import Supervised

ALL = ["patient", "slide", "patch"]


def _hierarchical(adversarial: bool, min_levels: list[str], max_levels: list[str]) -> dict[str, Any]:
    return {"family": "hidisc", "adversarial": adversarial, "min_levels": min_levels, "max_levels": max_levels}


def _dino(adversarial: bool) -> dict[str, Any]:
    # Self-distillation: no contrastive levels; `method.dino.positives` says where positives come from.
    return {"family": "dino", "adversarial": adversarial, "min_levels": [], "max_levels": []}


def _hlss(adversarial: bool, alignment: bool = True) -> dict[str, Any]:
    # HiDisc's levels, on attribute scores tied to language (hsat.methods.hlss); `alignment`
    # False drops the cross-modal term whatever method.hlss.alignment_weight says.
    return {**_hierarchical(adversarial, ALL, ALL), "family": "hlss", "alignment": alignment}


def _supervised(adversarial: bool) -> dict[str, Any]:
    # No hierarchy levels: the label is the only positive structure.
    return {"family": "supervised", "adversarial": adversarial, "min_levels": [], "max_levels": []}


def _pretrained() -> dict[str, Any]:
    # No objective at all: the encoder's weights are read from a file (hsat.encoders), not trained.
    return {"family": "pretrained", "adversarial": False, "min_levels": [], "max_levels": []}


METHODS: dict[str, MethodEntry] = {e.name: e for e in (
    # Non-adversarial baseline (HiDisc, Cheng et al. CVPR 2023).
    MethodEntry("hidisc", "HiDisc", "baseline", _hierarchical(False, ALL, ALL)),
    # HSAT-Patient: the full method (robust HiDisc).
    MethodEntry("hsat", "HSAT", "method", _hierarchical(True, ALL, ALL)),
    # Instance-level adversarial contrastive learning (views of a patch are the only positives).
    MethodEntry("hsat_patch", "HSAT-Patch", "level", _hierarchical(True, ["patch"], ["patch"])),
    # Patch + slide levels.
    MethodEntry("hsat_slide", "HSAT-Slide", "level", _hierarchical(True, ["slide", "patch"], ["slide", "patch"])),
    # Table 4 (L_max ablation): the attack maximises fewer levels; the encoder minimises all three.
    MethodEntry("hsat_lmax_patch", "HSAT (L_max: patch)", "lmax", _hierarchical(True, ALL, ["patch"])),
    MethodEntry("hsat_lmax_patch_slide", "HSAT (L_max: patch+slide)", "lmax", _hierarchical(True, ALL, ["slide", "patch"])),
    # References on labels, same backbone, crops and batches: the non-robust and the robust ceiling.
    MethodEntry("supervised", "Supervised", "reference", _supervised(False)),
    MethodEntry("supervised_at", "Supervised AT", "reference", _supervised(True)),
    # DINO self-distillation (Caron et al. 2021; Chen & Krishnan 2021 on pathology) and HSAT's
    # min-max around its loss.
    MethodEntry("dino", "DINO", "dino", _dino(False)),
    MethodEntry("robust_dino", "Robust DINO", "dino", _dino(True)),
    # HLSS (Watawana et al. MICCAI 2024): the hierarchy aligned with attribute descriptions, and
    # HSAT's min-max around its loss.
    MethodEntry("hlss", "HLSS", "hlss", _hlss(False)),
    MethodEntry("robust_hlss", "Robust HLSS", "hlss", _hlss(True)),
    # The reference code's effective objective: its alignment term is taken with .item().
    MethodEntry("hlss_noalign", "HLSS (no alignment)", "hlss", _hlss(False, alignment=False)),
    # An encoder the study did not train (a foundation model, your own checkpoint), evaluated as it is.
    MethodEntry("pretrained", "Pretrained encoder", "encoder", _pretrained()),
)}

VARIANTS: dict[str, dict[str, Any]] = {
    name: {k: v for k, v in e.defaults.items() if k in ("adversarial", "min_levels", "max_levels")}
    for name, e in METHODS.items()
}
"""Each named method's levels and adversarial flag (the view of `METHODS` older code reads)."""

OBJECTIVES: dict[str, type[Objective]] = {"hidisc": HiDisc, "supervised": Supervised, "dino": DINO, "hlss": HLSS}
"""Objective classes by family; `adversarial: true` wraps one in `Robust`."""


def method_label(name: str) -> str:
    """Display name of a method (its name when it is not a registered one)."""
    entry = METHODS.get(str(name))
    return entry.label if entry else str(name)


def methods_with_role(*roles: str) -> tuple[str, ...]:
    """Registered method names whose table role is one of `roles`, in registry order."""
    return tuple(name for name, e in METHODS.items() if e.role in roles)


def trains_encoder(method: Mapping[str, Any]) -> bool:
    """Whether a method section trains its encoder (False: the weights are imported as they are)."""
    entry = METHODS.get(str(method.get("name", "hsat")))
    return not (entry and entry.defaults.get("family") == "pretrained")


def resolve_method(method: Mapping[str, Any]) -> dict[str, Any]:
    """Expand a method section: start from the named entry, let explicit keys override it."""
    name = method.get("name", "hsat")
    if name not in METHODS and not {"adversarial", "min_levels", "max_levels"} <= set(method):
        raise HSATError(
            f"method.name {name!r} is not a known variant ({', '.join(METHODS)}); "
            "a custom variant must set adversarial, min_levels and max_levels"
        )
    out = dict(VARIANTS.get(name, {}))
    out.update({k: v for k, v in method.items()})
    out["name"] = name
    entry = METHODS.get(name)
    family = entry.defaults.get("family") if entry else None
    for own in ("dino", "hlss"):  # a family's own settings mean nothing to the others
        if family != own:
            out.pop(own, None)
    if family == "hlss":
        out.setdefault("alignment", bool(entry.defaults.get("alignment", True)))
    else:
        out.pop("alignment", None)
    weights = {lvl: 1.0 for lvl in LEVELS}
    weights.update(out.get("level_weights") or {})
    out["level_weights"] = weights
    out.setdefault("temperature", 0.07)
    out.setdefault("base_temperature", 0.07)
    # Keep levels in canonical order (patient, slide, patch) so logs and names are stable.
    out["min_levels"] = [lvl for lvl in LEVELS if lvl in out["min_levels"]]
    out["max_levels"] = [lvl for lvl in LEVELS if lvl in out["max_levels"]]
    return out


def build_objective(method: Mapping[str, Any]) -> Objective:
    """The objective of a resolved method section: its family's, made robust when adversarial."""
    entry = METHODS.get(method["name"])
    family = entry.defaults.get("family", "hidisc") if entry else "hidisc"
    if family not in OBJECTIVES:
        raise HSATError(f"method {method['name']!r} trains nothing (its encoder's weights are read from a file: "
                        "hsat pretrain imports them, hsat.encoders.import_encoder)")
    objective = OBJECTIVES[family](method)
    return Robust(objective) if method["adversarial"] else objective


__all__ = ["ALL", "DINO", "HLSS", "METHODS", "MethodEntry", "OBJECTIVES", "Objective", "Robust", "Supervised", "VARIANTS", "build_objective",
           "method_label", "methods_with_role", "resolve_method", "trains_encoder"]
