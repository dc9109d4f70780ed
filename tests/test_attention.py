"""ViT attention maps: the last block's attention as timm's own (unfused) forward computes it."""

from __future__ import annotations

import pytest
import torch

from hsat.errors import HSATError
from hsat.evaluate.attention import cls_attention_maps, last_self_attention
from hsat.models import build_model

torch.set_num_threads(1)


def test_attention_equals_timms_own_softmax_and_maps_to_the_patch_grid():
    torch.manual_seed(0)
    model = build_model("test_vit", head_hidden=(16,), embed_dim=8, image_size=32,
                        backbone_args={"patch_size": 4}).eval()
    x = torch.rand(3, 3, 32, 32)
    attn_mod = model.backbone.blocks[-1].attn
    attn_mod.fused_attn = False  # timm's explicit path, whose softmax goes through attn_drop
    seen = []
    handle = attn_mod.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model.encode(x)
    handle.remove()
    ours = last_self_attention(model, x)
    assert torch.allclose(ours, seen[-1], atol=1e-6)
    assert torch.allclose(ours.sum(-1), torch.ones_like(ours.sum(-1)), atol=1e-5)
    maps = cls_attention_maps(model, x)
    heads = attn_mod.num_heads
    assert maps.shape == (3, heads, 8, 8)
    prefix = model.backbone.num_prefix_tokens
    assert torch.allclose(maps.flatten(2), ours[:, :, 0, prefix:])


def test_attention_maps_need_a_vit():
    with pytest.raises(HSATError, match="ViT"):
        cls_attention_maps(build_model("test_resnet", head_hidden=(16,), embed_dim=8), torch.rand(1, 3, 16, 16))
