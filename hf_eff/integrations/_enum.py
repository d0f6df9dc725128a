"""Adding members to a library's closed string Enum (PEFT's PeftType, transformers' OptimizerNames)."""

from __future__ import annotations

import enum


def add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Adds `name = value` to a `str` Enum that offers no public way to extend it; returns the existing one if present."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    # Set the class attribute before the member maps: EnumType.__setattr__ refuses names already in the member map.
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member
