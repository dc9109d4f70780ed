"""Self-attention maps of a ViT encoder: what each head of the last block attends to from the
class token (Caron et al. 2021, Fig. 1; Chen & Krishnan 2021: heads that pick out distinct
tissue structures).

Computed from the last block's own projections (its pre-attention norm, qkv and q/k norms), so
the maps are those of the model's forward pass, whatever attention kernel timm runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hsat.errors import HSATError


def _vit(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "backbone", model)
    if not (hasattr(backbone, "blocks") and hasattr(backbone, "patch_embed") and len(backbone.blocks)):
        raise HSATError(f"attention maps need a ViT backbone (timm VisionTransformer), not {type(backbone).__name__}")
    return backbone


@torch.no_grad()
def last_self_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> (N, heads, T, T): softmax attention of the last block (T tokens,
    prefix tokens first)."""
    vit = _vit(model)
    block = vit.blocks[-1]
    captured: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    finally:
        handle.remove()
    tokens = block.norm1(captured[-1])
    attn = block.attn
    n, t, c = tokens.shape
    qkv = attn.qkv(tokens).reshape(n, t, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return F.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)


@torch.no_grad()
def cls_attention_maps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, heads, gh, gw): each head's attention from the class token to the patch tokens, on the
    patch grid (rows sum to 1 over the patch tokens and the prefix tokens together)."""
    vit = _vit(model)
    attn = last_self_attention(model, x)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    patch = vit.patch_embed.patch_size
    gh, gw = x.shape[-2] // patch[0], x.shape[-1] // patch[1]
    maps = attn[:, :, 0, prefix:]
    if maps.shape[-1] != gh * gw:
        raise HSATError(f"attention over {maps.shape[-1]} patch tokens does not match a {gh} x {gw} grid")
    return maps.reshape(*maps.shape[:2], gh, gw)
