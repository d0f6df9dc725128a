"""hf_eff: efficient-training research as first-class Hugging Face components."""

from __future__ import annotations

import importlib

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

# Public names backed by optional extras (TRL, diffusers, triton) map to their module here and are imported on first
# access (PEP 562), so `import hf_eff` needs only torch, transformers, peft and accelerate.
_LAZY_ATTRIBUTES: dict[str, str] = {}

__all__ = [
    "BlockLoraConfig",
    "BlockLoraModel",
    "LoraXSConfig",
    "LoraXSModel",
    "ShareLoraConfig",
    "ShareLoraModel",
    "__version__",
    *_LAZY_ATTRIBUTES,
]


def __getattr__(name: str):
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_eff' has no attribute '{name}'")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
