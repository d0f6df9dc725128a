"""PEFT adapters: ShareLoRA, LoRA-XS and Block-LoRA, registered with PEFT when hf_eff is imported."""

from __future__ import annotations

from dataclasses import dataclass

from .blocklora import BlockLoraConfig, BlockLoraModel
from .loraxs import LoraXSConfig, LoraXSModel
from .sharelora import ShareLoraConfig, ShareLoraModel


@dataclass(frozen=True)
class AdapterMethod:
    """One PEFT method hf_eff provides, with the paper it implements."""

    name: str
    config_cls: type
    model_cls: type
    paper: str

    @property
    def prefix(self) -> str:
        return self.model_cls.prefix


ADAPTER_METHODS = (
    AdapterMethod(
        "sharelora",
        ShareLoraConfig,
        ShareLoraModel,
        "ShareLoRA: Parameter Efficient and Robust Large Language Model Fine-tuning via Shared Low-Rank Adaptation",
    ),
    AdapterMethod(
        "loraxs", LoraXSConfig, LoraXSModel, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters"
    ),
    AdapterMethod(
        "blocklora", BlockLoraConfig, BlockLoraModel, "One Head Eight Arms: Block Matrix based Low Rank Adaptation"
    ),
)

__all__ = [
    "ADAPTER_METHODS",
    "AdapterMethod",
    "BlockLoraConfig",
    "BlockLoraModel",
    "LoraXSConfig",
    "LoraXSModel",
    "ShareLoraConfig",
    "ShareLoraModel",
]
