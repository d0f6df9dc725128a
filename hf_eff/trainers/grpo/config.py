"""GRPOConfig: TRL's GRPO configuration plus `prefix_grouping` (paper "Prefix Grouper")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import trl

PrefixGrouping = Literal["auto", True, False]
_TEXT_VALUES = {"auto": "auto", "true": True, "false": False}


def normalize_prefix_grouping(value) -> PrefixGrouping:
    """"auto", True or False; the strings "true"/"false"/"auto" (any case, as a command line passes them) too."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TEXT_VALUES:
        return _TEXT_VALUES[value.strip().lower()]
    raise ValueError(f'GRPOConfig: `prefix_grouping` must be "auto", True or False, got {value!r}')


@dataclass
class GRPOConfig(trl.GRPOConfig):
    """`trl.GRPOConfig` with one more field, `prefix_grouping`."""

    prefix_grouping: PrefixGrouping = field(
        default="auto",
        metadata={
            "help": 'Encode the prompt shared by a group of completions once ("Prefix Grouper"): each group is packed '
            "as one row [prompt, completion_1, ..., completion_G] for the policy, old-policy and reference passes. "
            'True forces it (a clear error where it cannot be used), False never uses it, "auto" uses it when the '
            "model supports it and the estimated saving pays, and otherwise logs why once and runs the standard "
            "forward. Results are the standard ones either way."
        },
    )

    def __post_init__(self):
        self.prefix_grouping = normalize_prefix_grouping(self.prefix_grouping)
        super().__post_init__()
