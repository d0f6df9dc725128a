"""Adapter configs exercised by the common test matrix."""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model

from hf_eff import BlockLoraConfig, LoraXSConfig, ShareLoraConfig
from hf_eff.adapters.base import LowRankConfig

# Each case builds a config for a target list; `init_weights=False` gives non-zero updates so that equality tests
# (merge, save/load, adapter switching) compare something that could differ.
CONFIG_CASES: dict[str, Callable[..., LowRankConfig]] = {
    "sharelora_A": lambda targets, **kw: ShareLoraConfig(r=4, share="A", target_modules=targets, **kw),
    "sharelora_B": lambda targets, **kw: ShareLoraConfig(r=4, share="B", target_modules=targets, **kw),
    "sharelora_AB": lambda targets, **kw: ShareLoraConfig(r=4, share="AB", target_modules=targets, **kw),
    "loraxs": lambda targets, **kw: LoraXSConfig(r=4, target_modules=targets, **kw),
    "loraxs_recompute": lambda targets, **kw: LoraXSConfig(r=4, save_factors=False, target_modules=targets, **kw),
    "blocklora": lambda targets, **kw: BlockLoraConfig(r=4, num_blocks=4, target_modules=targets, **kw),
}

# Methods whose update is exactly zero at init (LoRA-XS starts at R ~ N(0, 1e-5)).
ZERO_AT_INIT = {"sharelora_A", "sharelora_B", "sharelora_AB", "blocklora"}


def lora_with_the_same_update(adapted, base, targets):
    """PEFT LoRA on `base` whose every layer holds the (up, down) factors of `adapted`'s matching layer."""
    config = next(iter(adapted.peft_config.values()))
    lora = get_peft_model(base, LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=targets))
    with torch.no_grad():
        for name, module in lora.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                up, down = adapted.get_submodule(name).update_factors("default")
                module.lora_A["default"].weight.copy_(down)
                module.lora_B["default"].weight.copy_(up)
    return lora
