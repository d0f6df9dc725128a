"""Opt-in registration of hf_eff's optimizers as `TrainingArguments(optim="hf_eff_<name>")` choices."""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from packaging.version import Version

from hf_eff.optim.factory import OPTIMIZERS, optimizer_class, optimizer_cls_and_kwargs

from ._enum import add_enum_member

# The registry below is private to transformers; these are the versions whose layout was read and tested.
SUPPORTED_TRANSFORMERS = (Version("5.23"), Version("6"))
OPTIM_PREFIX = "hf_eff_"


def _parse_optim_args(name: str, optim_args: dict[str, str]) -> dict[str, Any]:
    """Converts `optim_args` strings to the types of the optimizer's own defaults; unknown keys are an error."""
    signature = inspect.signature(optimizer_class(name).__init__)
    hyperparameters = {}
    for key, text in optim_args.items():
        if key not in signature.parameters or key in ("self", "params", "lr", "betas", "eps", "weight_decay"):
            raise ValueError(
                f"`optim_args` key {key!r} is not a hyper-parameter of {OPTIM_PREFIX}{name}; TrainingArguments sets lr, "
                "betas, eps and weight_decay itself."
            )
        default = signature.parameters[key].default
        if isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError(f"`optim_args` {key}={text!r}: expected true or false.")
            hyperparameters[key] = text.lower() == "true"
        else:
            hyperparameters[key] = type(default)(text) if default is not None else text
    return hyperparameters


def _handler(name: str):
    def handler(ctx) -> tuple[type, dict[str, Any]]:
        hyperparameters = _parse_optim_args(name, dict(ctx.optim_args))
        return optimizer_cls_and_kwargs(
            ctx.args, ctx.model, name, target_modules=ctx.args.optim_target_modules, **hyperparameters
        )

    return handler


def register_trainer_optimizers() -> list[str]:
    """Makes `optim="hf_eff_galore_adamw"` (and the other hf_eff optimizers) valid `TrainingArguments` choices.

    Opt-in because it extends transformers' private optimizer registry; refused with a clear error outside the
    transformers versions it was tested with. Use `hf_eff.optim.optimizer_cls_and_kwargs` to avoid it entirely.
    Returns the registered names. Idempotent.
    """
    version = Version(transformers.__version__)
    low, high = SUPPORTED_TRANSFORMERS
    if not low <= Version(version.base_version) < high:
        raise RuntimeError(
            f"hf_eff's TrainingArguments optimizer names support transformers >={low},<{high}; found {version}. "
            "Pass `optimizer_cls_and_kwargs=hf_eff.optim.optimizer_cls_and_kwargs(args, model, name)` to Trainer instead."
        )
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    from transformers.training_args import OptimizerNames

    names = []
    for name in OPTIMIZERS:
        option = OPTIM_PREFIX + name
        member = add_enum_member(OptimizerNames, option.upper(), option)
        _OPTIMIZER_HANDLERS[member] = _handler(name)
        names.append(option)
    return names
