"""Block-LoRA: LoRA with one down-projection block shared by all input chunks (paper "One Head Eight Arms")."""

from .config import BlockLoraConfig
from .layer import BlockLoraLinear
from .model import BlockLoraModel

__all__ = ["BlockLoraConfig", "BlockLoraLinear", "BlockLoraModel"]
