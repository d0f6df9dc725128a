"""Block-LoRA tuner (paper "One Head Eight Arms")."""

from __future__ import annotations

from ..base import LowRankTuner
from .layer import BlockLoraLinear


class BlockLoraModel(LowRankTuner):
    """Creates a Block-LoRA model; use through `peft.get_peft_model(model, BlockLoraConfig(...))`."""

    prefix = "blocklora_"
    tuner_layer_cls = BlockLoraLinear
