"""Registers hf_eff's adapters as PEFT methods (PeftType members, config and tuner mappings)."""

from __future__ import annotations

from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import register_peft_method

from ._enum import add_enum_member


def register_peft_methods() -> None:
    """Makes ShareLoRA, LoRA-XS and Block-LoRA known to PEFT. Idempotent."""
    from hf_eff.adapters import ADAPTER_METHODS

    for method in ADAPTER_METHODS:
        peft_type = add_enum_member(PeftType, method.name.upper(), method.name.upper())
        if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is method.model_cls:
            continue
        register_peft_method(
            name=method.name, config_cls=method.config_cls, model_cls=method.model_cls, prefix=method.prefix
        )
