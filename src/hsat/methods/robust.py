"""Robust X: HSAT's min-max around any method's own loss.

The inner maximisation crafts PGD views that maximise X's attack loss (input gradients only,
parameters frozen, the model in `attack.bn_mode`); the encoder then minimises X's loss on them
(beside the clean views unless `attack.only_adversarial`). HSAT is robust HiDisc; its variants
differ only in the levels HiDisc minimises and the attack maximises.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import torch

from hsat.attacks import attack_mode, frozen, pgd
from hsat.methods.base import Objective


class Robust(Objective):
    adversarial = True

    def __init__(self, inner: Objective):
        super().__init__(inner.method)
        self.inner = inner

    uses_labels = True  # passes them on to an inner objective that uses them

    @property
    def output(self) -> str:  # type: ignore[override]
        return self.inner.output

    @property
    def needs_classifier(self) -> bool:  # type: ignore[override]
        return self.inner.needs_classifier

    def loss(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.inner.loss_of(z, labels)

    def loss_of(self, z: torch.Tensor, labels: torch.Tensor | None = None,
                local: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.inner.loss_of(z, labels, local)

    def attack_loss(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner.attack_loss_of(z, labels)

    # The inner method's state and hooks are the wrapper's.
    def setup(self, model: torch.nn.Module, total_steps: int) -> None:
        self.inner.setup(model, total_steps)

    def complete_config(self, cfg: dict[str, Any], out_dir: Any) -> None:
        self.inner.complete_config(cfg, out_dir)

    def init_model(self, model: torch.nn.Module) -> None:
        self.inner.init_model(model)

    def state_dict(self) -> dict[str, Any] | None:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def export_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.inner.export_model(model)

    def begin_step(self, model: torch.nn.Module, x: torch.Tensor, shape: tuple[int, ...], **kw: Any) -> None:
        self.inner.begin_step(model, x, shape, **kw)

    def local_outputs(self, net: torch.nn.Module, embed: Any, autocast: Any) -> torch.Tensor | None:
        return self.inner.local_outputs(net, embed, autocast)

    def before_optimizer_step(self, model: torch.nn.Module) -> None:
        self.inner.before_optimizer_step(model)

    def after_step(self, model: torch.nn.Module) -> None:
        self.inner.after_step(model)

    def adversarial_views(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        shape: tuple[int, ...],
        *,
        attack: Mapping[str, Any],
        eps: float,
        embed: Callable[..., list[torch.Tensor]],
        generator: torch.Generator | None = None,
        fast: torch.nn.Module | None = None,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """PGD on `attack_loss` of the embedded views (eps in 1/255). `embed(module, x, shape,
        autocast, output)` embeds a stack of views; `fast` is what the attack calls (default `model`)."""
        fast = model if fast is None else fast

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            (z_adv,) = embed(fast, x_adv, shape, autocast, self.output)
            return self.attack_loss(z_adv, labels)

        with frozen(model), attack_mode(model, attack["bn_mode"]):
            return pgd(x, objective, eps=float(eps) / 255, alpha=attack["alpha"] / 255, steps=attack["steps"],
                       random_start=attack["random_start"], generator=generator)

    def training_views(self, model, x, shape, *, attack, **kw):
        x_adv = self.adversarial_views(model, x, shape, attack=attack, **kw)
        return (None if attack["only_adversarial"] else x), x_adv
