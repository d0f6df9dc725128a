"""Update rules shared by hf_eff's optimizers, as pure functions over tensors (AdamW as in torch.optim.AdamW)."""

from __future__ import annotations

import torch


def adam_direction_(
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad: torch.Tensor,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
) -> torch.Tensor:
    """Updates both moments in place and returns d with AdamW's update θ ← θ − lr·d.

    Same arithmetic as `torch.optim.AdamW` (eps added after bias correction), so a full-rank, unprojected run of any
    hf_eff optimizer matches AdamW up to floating-point rounding order.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return exp_avg.div(denom).div_(bias_correction1)


def decoupled_weight_decay_(param: torch.Tensor, lr: float, weight_decay: float) -> None:
    """θ ← θ·(1 − lr·λ), applied before the update as AdamW does."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)


def seeded_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator determined by (seed, keys), e.g. (seed, parameter index, refresh count).

    Random choices (subspaces, masks, sketches) drawn from it are reproduced after a resume from the state dict alone,
    with no generator state to save.
    """
    mixed = seed
    for key in keys:
        mixed = (mixed * 1_000_003 + key + 1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)
