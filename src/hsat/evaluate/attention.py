"""Self-attention maps of a ViT encoder: what each head of the last block attends to from the
class token (Caron et al. 2021, Fig. 1; Chen & Krishnan 2021: heads that pick out distinct
tissue structures).

Computed from the last block's own projections (its pre-attention norm, qkv and q/k norms), so
the maps are those of the model's forward pass, whatever attention kernel timm runs.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from hsat.errors import HSATError
from hsat.evaluate.sweep import AttackSpec, craft_batch, eval_frozen
from hsat.io import atomic_path


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
        model.encode(x) if hasattr(model, "encode") else model(x)
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


def attention_under_attack(model: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int,
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """Class-token maps of `x` clean and under PGD on the feature objective (from a random start,
    eps/alpha in 1/255): {"images", "adv_images", "clean", "adv"} (maps (N, heads, gh, gw))."""
    spec = AttackSpec("pgd", float(eps), int(steps), "feature", float(alpha), seed)
    with eval_frozen(model):
        with torch.no_grad():
            f_clean = model.encode(x)
        x_adv = craft_batch(model, None, x, torch.zeros(len(x), dtype=torch.long, device=x.device), spec, f_clean,
                            torch.Generator(device=x.device).manual_seed(spec.generator_seed))
    return {"images": x.float().cpu(), "adv_images": x_adv.float().cpu(),
            "clean": cls_attention_maps(model, x).float().cpu(), "adv": cls_attention_maps(model, x_adv).float().cpu()}


def write_attention_maps(path, maps: dict[str, torch.Tensor], labels: torch.Tensor, meta: dict) -> None:
    """Maps, images and labels as one safetensors file (metadata: JSON of `meta`), atomically."""
    tensors = {**{k: v.contiguous() for k, v in maps.items()}, "labels": labels.long().cpu().contiguous()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta, sort_keys=True)})


def read_attention_maps(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of `write_attention_maps`; a file of another kind is an error naming it."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["meta"])
        tensors = load_file(str(path))
    except (OSError, KeyError, ValueError) as e:
        raise HSATError(f"{path}: not an attention-map file of hsat attention ({e})") from e
    missing = {"images", "adv_images", "clean", "adv", "labels"} - set(tensors)
    if missing:
        raise HSATError(f"{path}: attention-map file lacks {sorted(missing)}")
    return tensors, meta
