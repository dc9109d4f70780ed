"""DINO's parts on their own: head, teacher EMA, center, momentum schedule."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hsat.methods.dino import DINOHead, cancel_last_layer_gradients, ema_update, momentum_schedule, update_center

torch.set_num_threads(1)


def test_head_shape_normalised_bottleneck_and_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16)
    out = head(torch.randn(4, 32))
    assert out.shape == (4, 50)
    w = head.last_layer.weight  # (50, 16): every prototype has norm 1, and keeps it when trained
    assert torch.allclose(w.norm(dim=1), torch.ones(50), atol=1e-5)
    assert head.last_layer.bias is None
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(4, 32)).pow(2).sum().backward()
    opt.step()
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(50), atol=1e-5)
    # The logits are cosine similarities between the bottleneck and the prototypes: |logit| <= 1.
    assert head(torch.randn(8, 32)).abs().max() <= 1 + 1e-5


def test_last_layer_gradients_dropped_only_while_frozen():
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4)
    head(torch.randn(2, 8)).sum().backward()
    cancel_last_layer_gradients(head, step=0, freeze_steps=1)
    assert all(p.grad is None for p in head.last_layer.parameters())
    assert any(p.grad is not None for p in head.mlp.parameters())
    head(torch.randn(2, 8)).sum().backward()
    cancel_last_layer_gradients(head, step=1, freeze_steps=1)
    assert any(p.grad is not None for p in head.last_layer.parameters())


def test_momentum_schedule_is_a_cosine_from_base_to_one():
    m = momentum_schedule(0.996, 100)
    assert m[0] == 0.996 and len(m) == 100
    assert np.all(np.diff(m) >= 0) and m[-1] < 1.0 and abs(m[-1] - 1.0) < 1e-5
    assert abs(m[50] - (0.996 + 1.0) / 2) < 1e-9


def test_ema_update_and_center():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    before = teacher.weight.detach().clone()
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, 0.9 * before + 0.1 * student.weight.detach())
    ema_update(teacher, student, 0.0)
    assert torch.equal(teacher.weight, student.weight.detach())
    center = torch.zeros(5)
    out = torch.randn(2, 4, 5)
    new = update_center(center, out, 0.9)
    assert torch.allclose(new, 0.1 * out.reshape(-1, 5).mean(0))
