"""L-inf iterative attacks in pixel space: PGD, BIM (iterative FGSM) and MI-FGSM.

The same functions serve the inner maximisation of adversarial pretraining (objective = the
hierarchical contrastive loss) and white-box evaluation (objective = feature distance or
cross-entropy). Each takes `objective(x_adv) -> scalar to maximise`; use a *sum* over examples,
so a per-example gradient does not shrink with the batch size (sign() hides the scale for PGD
and BIM, and MI-FGSM normalises each example's gradient by its own mean |grad|).

Only the input gradient is computed (`torch.autograd.grad(obj, x_adv)`; never `.backward()`),
so no parameter `.grad` is touched. Wrap the attack in `frozen(model)` to skip building
parameter gradients at all, and in `attack_mode(model, bn_mode)` to choose the mode the model
runs in: "eval" uses batch-norm running statistics and leaves them untouched (the usual choice
for evaluation and our training default); "train" uses batch statistics like the training
forward does, but then every attack step also updates BN running statistics.

`start` (optional) is the random start's uniform draw in [0, 1) of x's shape, made by the caller
instead of from `generator`: a batch crafted in pieces then starts where the whole batch would.

Shapes are free ((N, C, H, W) or the hierarchical (P, S, K, V, C, H, W)): all operations are
elementwise, except MI-FGSM's normalisation, which is per image over the last three dims.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

Objective = Callable[[torch.Tensor], torch.Tensor]


def step_size(alpha: float, eps: float, steps: int, scale: float) -> float:
    """The step of an iterative attack: `alpha`, raised to `scale * eps / steps` when that is larger.

    Madry et al. (2018) take 2.5 * eps / steps so that the attack can cross the ball and back
    within its budget; a fixed alpha leaves a few-step attack at large eps short of converged
    (the default sweep's 5 steps of 2/255 at 8/255 found 6-8 points less than 10 steps did).
    Units are whatever eps and alpha share; scale 0 keeps alpha as given.
    """
    return max(float(alpha), float(scale) * float(eps) / max(int(steps), 1))


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Parameters of `modules` do not require grad inside the block; previous flags restored after."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: str = "eval") -> Iterator[None]:
    """Run the block with `model` in eval ("eval") or train ("train") mode; restore every submodule's mode after."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(bn_mode == "train")
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check(eps: float, alpha: float, steps: int) -> None:
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError(f"eps, alpha and steps must be non-negative, got {eps}, {alpha}, {steps}")
    if eps > 1 or alpha > 1:
        raise ValueError(
            f"eps={eps}, alpha={alpha} exceed 1: attacks take [0, 1] pixel units (8/255, not 8)"
        )


def _per_image_l1_mean(grad: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(max(grad.dim() - 3, 1), grad.dim())) if grad.dim() > 1 else (0,)
    return grad.abs().mean(dim=dims, keepdim=True).clamp_min(1e-12)


def _iterate(
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool,
    generator: torch.Generator | None,
    decay: float | None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    _check(eps, alpha, steps)
    x = x.detach()
    if eps == 0 or steps == 0:
        return x.clone()
    if random_start:
        noise = start if start is not None else torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = (x + (2 * noise - 1) * eps).clamp(0, 1)
    else:
        x_adv = x.clone()
    momentum = torch.zeros_like(x) if decay is not None else None
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            obj = objective(x_adv)
            if obj.dim() != 0:
                raise ValueError(f"objective must return a scalar, got shape {tuple(obj.shape)}")
            (grad,) = torch.autograd.grad(obj, x_adv)
        if momentum is not None:
            momentum = decay * momentum + grad / _per_image_l1_mean(grad)
            grad = momentum
        x_adv = x_adv.detach() + alpha * grad.sign()
        # Project onto the eps-ball around x, then onto the image range.
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1).detach()
    return x_adv


def _no_extra(name: str, kw: dict[str, Any]) -> None:
    if kw:
        raise TypeError(f"{name}() got unexpected keyword arguments: {', '.join(kw)}")


def pgd(
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Projected gradient ascent (Madry et al. 2018): uniform start in the ball, signed steps, projection."""
    _no_extra("pgd", kw)
    return _iterate(x, objective, eps, alpha, steps, random_start, generator, decay=None, start=start)


def bim(
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Basic iterative method (Kurakin et al. 2017): PGD from the clean image (no random start)."""
    _no_extra("bim", kw)
    return _iterate(x, objective, eps, alpha, steps, random_start, generator, decay=None, start=start)


def mifgsm(
    x: torch.Tensor,
    objective: Objective,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    decay: float = 1.0,
    start: torch.Tensor | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Momentum iterative FGSM (Dong et al. 2018): g <- decay*g + grad / mean|grad| per image; step sign(g).

    No random start by default, as in the original method and torchattacks.
    """
    _no_extra("mifgsm", kw)
    return _iterate(x, objective, eps, alpha, steps, random_start, generator, decay=float(decay), start=start)


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {"pgd": pgd, "bim": bim, "mifgsm": mifgsm}
"""Attack functions by the names used in the config (evaluation.whitebox.attacks)."""
