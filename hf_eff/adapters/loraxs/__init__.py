"""LoRA-XS: a trainable r×r matrix between frozen truncated-SVD factors of the base weight (paper "LoRA-XS")."""

from .config import LoraXSConfig
from .layer import LoraXSLinear
from .model import LoraXSModel

__all__ = ["LoraXSConfig", "LoraXSLinear", "LoraXSModel"]
