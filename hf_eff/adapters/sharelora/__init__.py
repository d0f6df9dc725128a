"""ShareLoRA: LoRA whose A and/or B is shared by all layers of the same projection (paper "ShareLoRA: … via Shared Low-Rank Adaptation")."""

from .config import ShareLoraConfig
from .layer import ShareLoraLinear
from .model import ShareLoraModel

__all__ = ["ShareLoraConfig", "ShareLoraLinear", "ShareLoraModel"]
