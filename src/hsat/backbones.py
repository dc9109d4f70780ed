"""What a timm backbone name says about its architecture, without importing torch or timm (the
workflow reads it while building its DAG; the report while judging claims)."""

from __future__ import annotations

from typing import Any

VIT_TOKENS = frozenset({"vit", "deit", "deit3", "beit", "eva", "eva02"})


def is_vit(backbone: Any) -> bool:
    """A timm Vision Transformer name: one of its `_`-separated parts is vit, deit, beit or eva
    (vit_small_patch16_224, deit3_base_patch16_224, test_vit; not the hybrid maxvit)."""
    return any(part in VIT_TOKENS for part in str(backbone).lower().split("_"))
