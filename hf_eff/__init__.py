"""hf_eff: efficient-training research as first-class Hugging Face components."""

from __future__ import annotations

from hf_eff.adapters import (
    BlockLoraConfig,
    BlockLoraModel,
    LoraXSConfig,
    LoraXSModel,
    ShareLoraConfig,
    ShareLoraModel,
)
from hf_eff.integrations.peft import register_peft_methods

__version__ = "0.1.0"

# PEFT finds a saved adapter's config class only through its registry, so the methods are registered at import
# (`PeftModel.from_pretrained` then works after a plain `import hf_eff`).
register_peft_methods()

__all__ = [
    "BlockLoraConfig",
    "BlockLoraModel",
    "LoraXSConfig",
    "LoraXSModel",
    "ShareLoraConfig",
    "ShareLoraModel",
    "__version__",
]
