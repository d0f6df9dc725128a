"""Config fields common to hf_eff's low-rank adapters, named as in PEFT's LoraConfig so users can switch in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import PeftConfig, PeftType


@dataclass
class LowRankConfig(PeftConfig):
    """Base config of an adapter with ΔW = B·(…)·A·(lora_alpha / r) on `nn.Linear` / `Conv1D` targets."""

    method_name: ClassVar[str] = ""

    r: int = field(default=8, metadata={"help": "Rank of the low-rank update."})
    lora_alpha: float = field(default=8, metadata={"help": "The update is scaled by lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match), a regex (full match) or 'all-linear'. Defaults to PEFT's LoRA "
            "targets for the model type (q/v projections)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex never adapted."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the method's init (the update starts at or near zero). False: random, for tests."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, e.g. 'layers' or 'h', used with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained fully and saved, e.g. a classifier head."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType(self.method_name.upper())
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform`: which layer indices to adapt.")
