"""Registers hf_eff's adapters as PEFT methods (PeftType members, config and tuner mappings)."""

from __future__ import annotations

from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import register_peft_method


def _add_peft_type(name: str) -> PeftType:
    """Adds `name` (upper case, value == name) to PEFT's `PeftType` enum; PEFT offers no public way to extend it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    # Set the class attribute before the member maps: EnumType.__setattr__ refuses names already in the member map.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register_peft_methods() -> None:
    """Makes ShareLoRA, LoRA-XS and Block-LoRA known to PEFT. Idempotent."""
    from hf_eff.adapters import ADAPTER_METHODS

    for method in ADAPTER_METHODS:
        peft_type = _add_peft_type(method.name.upper())
        if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is method.model_cls:
            continue
        register_peft_method(
            name=method.name, config_cls=method.config_cls, model_cls=method.model_cls, prefix=method.prefix
        )
