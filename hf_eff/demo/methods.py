"""The methods the demo compares, each a PEFT config built for a rank and the task's target modules."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftConfig

from hf_eff.adapters import BlockLoraConfig, LoraXSConfig, ShareLoraConfig


@dataclass(frozen=True)
class AdapterSpec:
    """What every method's config shares, so that only the method differs between runs."""

    rank: int
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...] | None

    def lora_kwargs(self) -> dict:
        # lora_alpha = r makes the scaling 1 for every method and rank, so the learning rate alone sets the step size.
        return {
            "r": self.rank,
            "lora_alpha": self.rank,
            "target_modules": list(self.target_modules),
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
        }


@dataclass(frozen=True)
class DemoMethod:
    """A method the demo trains: its PEFT config, its learning rate relative to LoRA's, and its optimizer."""

    name: str
    label: str
    build_config: Callable[[AdapterSpec], PeftConfig]
    lr_multiplier: float = 1.0
    make_optimizer: Callable[[list[dict]], torch.optim.Optimizer] = torch.optim.AdamW


def _lora(spec: AdapterSpec) -> PeftConfig:
    return LoraConfig(**spec.lora_kwargs())


def _sharelora(spec: AdapterSpec) -> PeftConfig:
    return ShareLoraConfig(share="A", **spec.lora_kwargs())


def _loraxs(spec: AdapterSpec) -> PeftConfig:
    # Only R goes into the checkpoint; the frozen SVD factors are recomputed from the (pinned) base model on load.
    return LoraXSConfig(save_factors=False, **spec.lora_kwargs())


def _blocklora(spec: AdapterSpec) -> PeftConfig:
    return BlockLoraConfig(num_blocks=4, **spec.lora_kwargs())


# LoRA-XS trains only r² numbers per module between frozen singular vectors, so it needs a much larger step.
DEMO_METHODS: dict[str, DemoMethod] = {
    method.name: method
    for method in (
        DemoMethod("lora", "LoRA (peft)", _lora),
        DemoMethod("sharelora", "ShareLoRA (share=A)", _sharelora),
        DemoMethod("loraxs", "LoRA-XS", _loraxs, lr_multiplier=10.0),
        DemoMethod("blocklora", "Block-LoRA (n=4)", _blocklora),
    )
}
