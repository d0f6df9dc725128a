"""hf_eff: efficient-training research as first-class Hugging Face components."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved on first access (PEP 562) so that optional extras are imported
# only by the users who need them.
_LAZY_ATTRIBUTES = {
    "ShareLoraConfig": "hf_eff.adapters",
    "ShareLoraModel": "hf_eff.adapters",
    "LoraXSConfig": "hf_eff.adapters",
    "LoraXSModel": "hf_eff.adapters",
    "BlockLoraConfig": "hf_eff.adapters",
    "BlockLoraModel": "hf_eff.adapters",
}

__all__ = ["__version__", *_LAZY_ATTRIBUTES]

if TYPE_CHECKING:
    from hf_eff.adapters import (
        BlockLoraConfig,
        BlockLoraModel,
        LoraXSConfig,
        LoraXSModel,
        ShareLoraConfig,
        ShareLoraModel,
    )


def __getattr__(name: str):
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_eff' has no attribute '{name}'")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)


# PEFT finds a saved adapter's config class only through its registry, so the methods are registered at import
# (`PeftModel.from_pretrained` then works after a plain `import hf_eff`).
from hf_eff.integrations.peft import register_peft_methods  # noqa: E402

register_peft_methods()
