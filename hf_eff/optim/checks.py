"""Checks shared by hf_eff's optimizers: hyper-parameters, gradients before a step, integer state on load."""

from __future__ import annotations

import math
from typing import Any

import torch


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int or float that is not a bool; inf and nan included."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float that is not a bool, inf or nan."""
    return is_real(value) and math.isfinite(value)


def require(condition: bool, optimizer_name: str, name: str, expected: str, value: Any) -> None:
    """ValueError "<optimizer>: `name` must be <expected>, got <value>" unless `condition` holds."""
    if not condition:
        raise ValueError(f"{optimizer_name}: `{name}` must be {expected}, got {value!r}")


def check_adamw_hyperparameters(group: dict[str, Any], optimizer_name: str) -> None:
    """The AdamW part of a (defaults-merged) group: lr, eps, weight_decay finite >= 0, betas in [0, 1), target a bool."""
    for name in ("lr", "eps", "weight_decay"):
        require(
            is_finite_number(group[name]) and group[name] >= 0,
            optimizer_name,
            name,
            "a finite number >= 0",
            group[name],
        )
    betas = group["betas"]
    require(
        isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_finite_number(b) and 0 <= b < 1 for b in betas),
        optimizer_name,
        "betas",
        "a pair of numbers in [0, 1)",
        betas,
    )
    require(isinstance(group["target"], bool), optimizer_name, "target", "a bool", group["target"])


def _is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def check_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Refuses sparse (RuntimeError), sharded (NotImplementedError) and non-finite (FloatingPointError) gradients
    before a step changes anything.

    The finiteness test costs one host synchronization per device; only when it fails are the parameters searched,
    so that the error names the first offending one by its index across all groups (parameters without a gradient
    counted too) and its shape.
    """
    name = type(optimizer).__name__
    finite_flags: dict[torch.device, list[torch.Tensor]] = {}  # per device: each gradient's min and max
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{name} does not support sparse gradients (use dense ones, e.g. no sparse=True)")
            if _is_dtensor(param):
                # A projection or mask built from one shard would silently be wrong: refuse, before any state exists.
                raise NotImplementedError(
                    f"{name} got a DTensor (FSDP2 / tensor-parallel sharded) parameter of global shape "
                    f"{tuple(param.shape)}; hf_eff's optimizers need full gradients. Use DDP, or FSDP with "
                    "use_orig_params and no sharding of the targeted weights."
                )
            if param.grad.numel():
                # min and max carry any nan/inf, in one reduction and without isfinite's full-size boolean tensor
                finite_flags.setdefault(param.grad.device, []).extend(torch.aminmax(param.grad))
    if all(bool(torch.isfinite(torch.stack(extremes)).all()) for extremes in finite_flags.values()):
        return
    index = -1
    for group_index, group in enumerate(optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            index += 1
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                raise FloatingPointError(
                    f"{name}: non-finite gradient for parameter {index} of shape {tuple(param.shape)} (group "
                    f"{group_index}, position {position}; inf or nan); the step was not taken and no parameter or "
                    "optimizer state was changed (clip gradients, or let torch.amp.GradScaler skip such steps)"
                )


def restore_integer_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Puts the saved integer and bool state tensors back after `torch.optim.Optimizer.load_state_dict`.

    torch casts every state tensor of a floating-point parameter (but `step`) to the parameter's dtype, which breaks
    indices and masks (in bf16, 257 becomes 256). Every saved per-parameter state tensor whose dtype is not floating
    point, whatever its key, is restored with its saved dtype, on the parameter's device.
    """
    saved_ids = [param_id for group in state_dict["param_groups"] for param_id in group["params"]]
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for param_id, param in zip(saved_ids, params):
        for key, value in state_dict["state"].get(param_id, {}).items():
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                optimizer.state[param][key] = value.to(device=param.device)


class KeepsIntegerStateOnLoad:
    """Mixin for a `torch.optim.Optimizer` subclass: `load_state_dict` keeps integer state tensors' dtypes.

    List it before `torch.optim.Optimizer` among the bases.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        restore_integer_state(self, state_dict)  # type: ignore[arg-type]
